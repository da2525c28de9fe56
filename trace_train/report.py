"""Run logging besides metrics.jsonl: TensorBoard and Weights & Biases, as `train.report_to` asks ("tensorboard",
"wandb", both comma-separated, or "" for none), from rank 0 only, each with the run's resolved config.

- TensorBoard: event files in <output_dir>/tensorboard, every numeric metric as a scalar at its step, the config
  as text; a resumed run purges the events after the step it resumes from, so rerun steps are not doubled.
- Weights & Biases: `wandb.init(project=train.wandb_project, dir=output_dir, config=...)`, offline (a run folder
  under <output_dir>/wandb, to `wandb sync` later) when no API key is set and WANDB_MODE does not say otherwise;
  the run id is kept in <output_dir>/wandb_id, so a resumed run continues the same run, and every metric is
  plotted against our `step` (W&B's own step must only grow; a rerun step would be refused).

Neither package is required: a backend that is asked for but not installed is a config error at load time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import uuid

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs


def parse_report_to(value: str) -> list[str]:
    """The backends of a train.report_to value; ValueError naming the key for an unknown or missing one."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"train.report_to: unknown {name!r} (tensorboard | wandb, comma-separated, or empty)")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise ValueError(f"train.report_to = {name!r} but {BACKENDS[name]} is not installed "
                             f"(pip install 'trace-kernels[report]')")
    return names


class Reporters:
    """The run's loggers (none on ranks other than 0)."""

    def __init__(self, cfg, main: bool, start_step: int, config_toml: str):
        self.tb = self.wandb = None
        if not main:
            return
        out = cfg.train.output_dir
        names = parse_report_to(cfg.train.report_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(out, "tensorboard"), purge_step=start_step or None)
            self.tb.add_text("config", "```\n" + config_toml + "\n```", global_step=start_step)
        if "wandb" in names:
            import wandb

            id_path = os.path.join(out, "wandb_id")
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id)
            offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") in (None, "")
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=out, id=run_id, resume="allow",
                                    config=dataclasses.asdict(cfg), mode="offline" if offline else None,
                                    name=os.path.basename(os.path.normpath(out)))
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")

    def log(self, row: dict) -> None:
        """One step's metrics (None values, where nothing was measured, are left out)."""
        scalars = {k: float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, global_step=row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({"step": row["step"], **scalars})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
