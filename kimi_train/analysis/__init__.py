"""Reading finished (or running) run directories: tables and plots.

    runs.py         read metrics.jsonl + config.yaml of a run; RunSummary, summarise(), best_per_optimizer()
    report.py       `kimi-train-report`: a markdown table over runs (and --plots: sweep_plots)
    plots.py        `kimi-train-plot`: one figure per metric for one or more runs (also written at the end of a run)
    sweep_plots.py  figures that compare runs (stability, lr sweep, steps to target)
"""
