"""Recipes: YAML files of training settings, shared defaults at the top and per-stage overrides under ``stages``."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"
FLOATS = ("lr", "weight_decay", "warmup", "decay", "min_lr_ratio", "grad_clip", "temperature", "inherited_lr_scale")
INTS = ("tokens", "seq_len", "micro_batch", "batch_tokens", "checkpoint_every", "seed", "val_tokens", "eval_tokens",
        "d_state", "select_tokens")
# The teachers named in the recipes; anything else gets the recipe given by --recipe (default: by size, else smoke).
RECIPE_FOR_TEACHER = {"smollm2-135m": "smollm2-135m", "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
                      "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b", "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b"}


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):  # a built-in name ("llama-3.2-1b" has a dot but is no file)
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"recipe {name_or_path!r}: not found (built-in: {', '.join(available())}, or a .yaml path)")
    recipe = yaml.safe_load(path.read_text())
    recipe["name"] = path.stem
    recipe["stages"] = {int(k): dict(v or {}) for k, v in (recipe.get("stages") or {}).items()}
    for s in (1, 2, 3):
        recipe["stages"].setdefault(s, {})
    return normalise(recipe)


def normalise(recipe: dict) -> dict:
    """YAML 1.1 reads '1e-3' as a string: coerce the numeric fields, everywhere."""
    def fix(d):
        for k in FLOATS:
            if d.get(k) is not None:
                d[k] = float(d[k])
        for k in INTS:
            if d.get(k) is not None:
                d[k] = int(float(d[k]))
    fix(recipe)
    for s in recipe["stages"].values():
        fix(s)
    return recipe


def stage_config(recipe: dict, stage: int) -> dict:
    """The settings one stage trains with: recipe defaults, then that stage's overrides."""
    cfg = {k: copy.deepcopy(v) for k, v in recipe.items() if k != "stages"}
    cfg.update(recipe["stages"][stage])
    missing = [k for k in ("tokens", "lr", "seq_len", "micro_batch", "batch_tokens") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"recipe {recipe.get('name')!r}: stage {stage} has no {', '.join(missing)}")
    return cfg
