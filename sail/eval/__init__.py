"""Evaluation: the tasks (tasks.py), their datasets (evalsets.py), templates, segmentation, 
the CLIP_benchmark route and search.
"""
