"""Visual-information-flow calibration: search a pruner's hyperparameters offline so that pruning changes the model's
final state as little as possible (VFlowOpt, ICCV 2025, §3.3).

The objective is the reference's: the mean cosine similarity, over a few unlabelled samples, between the last prompt
token's last-layer hidden state with and without pruning (the state the first answer token is read from). The search is
Bayesian, as in the reference, here with optuna's ``GPSampler``, seeded. The reference
(``lmms_eval/models/llava_ov_opt_all.py``) uses scikit-optimize's ``Optimizer`` with its defaults: a Gaussian-process
surrogate with the ``gp_hedge`` acquisition (a mix of lower confidence bound, expected and probability of improvement;
its expected-improvement line is commented out), 27 random initial points and 300 calls. The result is a JSON file that
``vlprune run/eval --config`` loads::

    {"method": "vflowopt", "keep": 64, "options": {"ratios": [...], "sensitivity": ..., ...}, "score": 0.98, ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vlprune import pruners
from vlprune.adapters import adapter_for
from vlprune.engine import attach
from vlprune.errors import VlpruneError
from vlprune.eval.datasets import VQASample
from vlprune.eval.files import write_text_atomically
from vlprune.pruners.base import resolve_keep


def vflowopt_space(trial: Any, share: float) -> dict[str, Any]:
    """The reference's search space, written for a 25% budget and scaled to ``share``: R1 in [share, 1.5 share],
    R2 in [0.8 share / R1_max, 1], t in [0, 50], m in [3, 24] (patches of a 27 x 27 grid), α in [-1, 1]."""
    r1_high = min(1.0, 1.5 * share)
    r1 = trial.suggest_float("r1", share, r1_high)
    r2 = trial.suggest_float("r2", min(1.0, 0.8 * share / r1_high), 1.0)
    return {
        "ratios": [r1, r2],
        "sensitivity": trial.suggest_float("sensitivity", 0.0, 50.0),
        "cell": trial.suggest_float("cell", 3.0, 24.0),
        "entropy_weight": trial.suggest_float("entropy_weight", -1.0, 1.0),
    }


def vflowopt_start(pruner: Any, num_visual: int, num_layers: int, share: float) -> dict[str, float]:
    """The default configuration's point in :func:`vflowopt_space` (clamped into it): the search's first trial."""
    (r1, r2, _), t, m, alpha = pruner.settings(num_visual, num_layers)
    r1_high = min(1.0, 1.5 * share)

    def clamp(value: float, low: float, high: float) -> float:
        return min(max(value, low), high)

    return {
        "r1": clamp(r1, share, r1_high),
        "r2": clamp(r2, min(1.0, 0.8 * share / r1_high), 1.0),
        "sensitivity": clamp(t, 0.0, 50.0),
        "cell": clamp(m, 3.0, 24.0),
        "entropy_weight": clamp(alpha, -1.0, 1.0),
    }


SEARCH_SPACES: dict[str, Callable[[Any, float], dict[str, Any]]] = {"vflowopt": vflowopt_space}
STARTS: dict[str, Callable[[Any, int, int, float], dict[str, float]]] = {"vflowopt": vflowopt_start}


@torch.inference_mode()
def last_token_states(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(S, D) the last prompt token's last-layer hidden state of every sample (prompts are left-padded)."""
    states = [model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, -1] for batch in batches]
    return torch.cat(states).float()


def encode(pipeline: Any, samples: Sequence[VQASample], size: int) -> list[dict[str, torch.Tensor]]:
    """The samples as the pipeline's model inputs (left-padded), in batches of ``size``."""
    if size < 1:
        raise VlpruneError(f"batch_size={size} must be at least 1")
    return [
        pipeline.model_inputs(
            [s.image for s in samples[start : start + size]],
            [pipeline.chat_prompt(s.question) for s in samples[start : start + size]],
        )
        for start in range(0, len(samples), size)
    ]


def calibrate(
    pipeline: Any,
    method: str,
    keep: int | float,
    samples: Sequence[VQASample],
    *,
    trials: int = 50,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Search ``method``'s hyperparameters for the budget ``keep`` on ``samples`` (their answers are not used).

    The first trial is the method's default configuration, so the result scores at least as well as the default.

    Returns:
        ``{"method", "keep", "options", "score", "default_score", "trials", "samples"}``: the best options, their mean
        cosine and the default configuration's.

    Raises:
        VlpruneError: a method without a search space, no samples, or fewer than one trial.
    """
    import optuna

    if method not in SEARCH_SPACES:
        raise VlpruneError(f"no calibration search space for {method!r}; methods with one: {', '.join(SEARCH_SPACES)}")
    if not samples:
        raise VlpruneError("calibration needs at least one sample")
    if trials < 1:
        raise VlpruneError(f"trials={trials} must be at least 1")
    model = pipeline.model
    batches = encode(pipeline, samples, batch_size)
    reference = last_token_states(model, batches)
    num_visual = int((batches[0]["input_ids"][0] == model.config.image_token_id).sum())
    share = resolve_keep(keep, num_visual) / num_visual

    def objective(trial: Any) -> float:
        options = SEARCH_SPACES[method](trial, share)
        try:
            pruner = pruners.create(method, keep=keep, **options).use_tokenizer(pipeline.processor)
            with attach(model, pruner, positions=pipeline.positions):
                states = last_token_states(model, batches)
        except VlpruneError:
            raise optuna.TrialPruned() from None  # outside the budget (for example R1 and R2 spend it all)
        return float(torch.nn.functional.cosine_similarity(states, reference, dim=-1).mean())

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    # The first trial is the method's default configuration, so the result is never worse than the default.
    default = pruners.create(method, keep=keep)
    num_layers = adapter_for(model).language_model_shape().num_layers
    study.enqueue_trial(STARTS[method](default, num_visual, num_layers, share))
    # The bar is closed on failure too, so that the error is printed on a line of its own.
    with tqdm(total=trials, desc=f"calibrate {method}", disable=not progress) as bar:

        def update(study: Any, trial: Any) -> None:
            bar.update(1)
            completed = [t for t in study.trials if t.value is not None]
            if completed:
                bar.set_postfix(best=f"{study.best_value:.4f}")

        study.optimize(objective, n_trials=trials, callbacks=[update])
    if not any(t.value is not None for t in study.trials):
        raise VlpruneError(f"no trial of {method} fitted the budget keep={keep}; raise keep or run more trials")
    best = study.best_trial
    options = SEARCH_SPACES[method](optuna.trial.FixedTrial(best.params), share)
    return {
        "method": method,
        "keep": keep,
        "options": options,
        "score": best.value,
        "default_score": study.trials[0].value,
        "trials": trials,
        "samples": len(samples),
    }


def write_config(config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a calibration result as JSON atomically (a crash never leaves half a file)."""
    return write_text_atomically(path, json.dumps(config, indent=2) + "\n")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config written by :func:`write_config` (or by hand): ``method``, optional ``keep`` and ``options``.

    Raises:
        VlpruneError: a missing or unreadable file, or one without a ``method``.
    """
    if Path(path).is_dir():
        raise VlpruneError(f"config file {str(path)!r} is a folder; give the JSON file `vlprune calibrate` wrote")
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VlpruneError(f"config file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VlpruneError(f"config file {str(path)!r} is not valid JSON: {error}") from None
    except OSError as error:
        raise VlpruneError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise VlpruneError(f'config file {str(path)!r} must be a JSON object with a "method" name')
    if not isinstance(config.get("options", {}), dict):
        raise VlpruneError(f'config file {str(path)!r}: "options" must be an object of method options')
    return config
