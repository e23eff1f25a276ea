"""Command-line tools around the model.

    inspect_model.py  `kimi-train-inspect`: parameter counts (total, activated, per part) without allocating weights
    hf.py             `kimi-train-export`: Hugging Face (transformers DeepseekV3) export and load
    run_model.py      load_model_from_run: a run's model from its config and a checkpoint of either engine
    prepare.py        `kimi-train-prepare`: a source tokenized into a prepared dataset (Megatron shards)
"""
