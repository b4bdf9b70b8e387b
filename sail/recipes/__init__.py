"""Full-model recipes (ALIP, ALIGN), shipped with the package with their configs (configs/NAME.yaml).

    sail recipe alip --config alip-tiny --steps 20          # or: python -m sail.recipes.alip --config alip-tiny
    torchrun --nproc_per_node 8 -m sail.recipes.align --config align-efficientnet-b7 --data alt.parquet

Each recipe is one script plus one YAML. The library never imports a recipe: `sail recipe` (sail.recipes.runner.run_recipe)
runs one by module name.

Beside the recipes: runner.py (the loop behind `sail recipe`), config.py, batches.py (image-text batches) and
filter.py (`sail filter`), the machinery they share.
"""
