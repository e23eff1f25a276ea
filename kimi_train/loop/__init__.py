"""The training loop and its parts.

    trainer.py     Trainer: builds model, data, optimizer from a TrainConfig; train_step() and fit()
    schedule.py    learning-rate schedules (warmup + WSD / cosine / constant), a pure function of the step
    checkpoint.py  atomic distributed checkpoints (DCP), resume, load_model_from_run
    metrics.py     metrics.jsonl, wandb, FLOPs per token and MFU

Nothing is imported here. The config imports nothing of the loop (the schedule reads its valid names from it).
"""
