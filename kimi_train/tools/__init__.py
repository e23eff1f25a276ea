"""Command-line tools around the model.

    inspect_model.py  `kimi-train-inspect`: parameter counts (total, activated, per part) without allocating weights
    hf.py             `kimi-train-export`: Hugging Face (transformers DeepseekV3) export and load
    prepare.py        `kimi-train-prepare`: a source tokenized into a prepared dataset (Megatron shards)
"""
