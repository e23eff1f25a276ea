"""The training loop and its parts.

    trainer.py     Trainer: builds data, model and its engine from a TrainConfig; train_step() and fit()
    schedule.py    learning-rate schedules (warmup + WSD / cosine / constant), a pure function of the step
    checkpoint/    atomic distributed checkpoints (DCP) of the engine's state: manifest, store, load (resume)
    run_record.py  what a rerun of a run directory may do; config.yaml and summary.json
    metrics.py     metrics.jsonl, wandb, FLOPs per token and MFU

Nothing is imported here. The config imports nothing of the loop (the schedule reads its valid names from it).
"""
