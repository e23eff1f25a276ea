"""Every ```python block of README.md and docs/*.md runs as written.

Markers, an HTML comment on the line just before the fence (GitHub does not render it):

    <!-- fragment -->   not run: an API signature or an outline with names the page does not define
    <!-- continue -->   runs after the previous (not fragment) python block of the same page, in its namespace
    <!-- gpu -->        runs only where CUDA is available

A block runs in a fresh namespace (``__name__ == "__main__"``) in its own temporary working
directory. A block that reads a run directory finds one there, made by a fixture below from a
2-layer model trained for a few steps: ``runs/tiny-muonclip`` (checkpoints at steps 2 and 200)
and ``runs/qk_clip_stability/muonclip`` (MuonClip with a small tau, so that heads clip, and
the post-step max logits logged). Only ```python fences are code here: a fence without a
language is a diagram or an output, and one that starts like Python fails the check below.
Bash blocks are not run.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKERS = ("fragment", "continue", "gpu")
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(\w+)\s*-->\s*$")
LOOKS_LIKE_PYTHON = re.compile(r"^(import \w|from [\w.]+ import )")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        before = MARKER.match(lines[start - 1]) if start else None
        found.append(Block(page, start + 1, lang, before.group(1) if before else None,
                           "\n".join(lines[start + 1 : i]) + "\n"))
        i += 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang == "python"]


def test_markers_are_known_and_untagged_blocks_are_not_python():
    for b in ALL:
        assert b.marker is None or b.marker in MARKERS, f"{b.id}: unknown marker <!-- {b.marker} -->"
        first = next((line for line in b.code.splitlines() if line.strip()), "")
        assert b.lang or not LOOKS_LIKE_PYTHON.match(first), f"{b.id}: Python without ```python: tag it"
    assert len(PYTHON) >= 15  # the parser still finds the blocks


# ------------------------------------------------------------------------------- run directories
def _train(run_dir: Path, steps: int, **kw) -> "Trainer":  # noqa: F821
    from omegaconf import OmegaConf

    from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, QKClipConfig,
                                   ScheduleConfig, TrainConfig, TrainLoopConfig, validate)
    from kimi_train.loop.trainer import Trainer
    from kimi_train.model.config import ModelConfig

    model = ModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    cfg = validate(TrainConfig(
        model=model, optim=OptimConfig(lr=0.02, qk_clip=QKClipConfig(tau=kw.get("tau", 100.0))),
        train=TrainLoopConfig(steps=steps, seq_len=32, micro_batch_size=4, log_every=1, val_every=0, val_batches=1),
        schedule=ScheduleConfig(warmup_steps=0), data=DataConfig(max_bytes=60_000),
        checkpoint=CheckpointConfig(every=0, keep=2),
        logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False,
                              post_step_max_logit=kw.get("post_step", False))))
    trainer = Trainer(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))  # writes config.yaml
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    tiny = _train(root / "tiny-muonclip", steps=2)
    tiny.step = 200  # a second checkpoint, for load_model_from_run(..., step=200)
    tiny.save()
    _train(root / "qk_clip_stability" / "muonclip", steps=6, tau=0.05, post_step=True)
    return {"runs/tiny-muonclip": root / "tiny-muonclip",
            "runs/qk_clip_stability/muonclip": root / "qk_clip_stability" / "muonclip"}


# ------------------------------------------------------------------------------- the blocks
def _chain(block: Block) -> list[Block]:
    """The block, after the blocks it continues."""
    on_page = [b for b in PYTHON if b.page == block.page and b.marker != "fragment"]
    i = on_page.index(block)
    chain = [block]
    while chain[0].marker == "continue":
        i -= 1
        assert i >= 0, f"{block.id}: <!-- continue --> without a python block before it"
        chain.insert(0, on_page[i])
    return chain


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker != "fragment"], ids=lambda b: b.id)
def test_block_runs(block, request, tmp_path, monkeypatch, capsys):
    chain = _chain(block)
    if any(b.marker == "gpu" for b in chain) and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{block.id}.py", "runs/qk_clip_stability/muonclip"])
    code = "".join(b.code for b in chain)
    needed = [name for name in ("runs/tiny-muonclip", "runs/qk_clip_stability/muonclip") if name in code]
    if needed:
        runs = request.getfixturevalue("run_dirs")
        for name in needed:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).symlink_to(runs[name], target_is_directory=True)
    namespace = {"__name__": "__main__"}
    for b in chain:
        exec(compile(b.code, b.id, "exec"), namespace)
    capsys.readouterr()
