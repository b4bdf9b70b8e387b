"""Training: heads and towers, losses (+ the shared block pieces and the Triton kernel), the step
(GradCache), optimizers, checkpoints, stability, the run log, the engine, `sail align` over
cached features (align_heads.py), and SAILModel (model.py: encoders + trained heads).
"""
