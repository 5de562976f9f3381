"""An own training loop for fabric: ``train_func(config)`` runs on every Ray Train worker.

fabric starts it in its TorchTrainer (train.num_workers, restarts, checkpoint storage) and in each Tune trial;
``fabric.train.session`` gives this worker's data shard, the configured model, fabric's loss and metrics, and
a report that checkpoints in fabric's format, so register, export, serve and monitor work as for fabric's loop.
This one adds what fabric's loop lacks: a cosine learning-rate schedule and gradient clipping.
"""

from __future__ import annotations

from typing import Any

import torch

from fabric.train import session


def train_func(config: dict[str, Any]) -> None:
    """Train ``train.model`` (fabric's MLP here) for ``epochs``, reporting val metrics and a checkpoint each epoch."""
    s = session.start(config)
    model = s.prepare(s.build_model())
    opt = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    epochs = int(config["epochs"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    start = s.resume(model, opt)  # 0, or the epoch of the checkpoint a restart resumes from
    for _ in range(start):
        schedule.step()
    for epoch in range(start + 1, epochs + 1):
        model.train()
        total, rows = 0.0, 0
        for x, y in s.batches("train", epoch):
            loss = s.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
            total, rows = total + float(loss) * len(y), rows + len(y)
        schedule.step()
        metrics = {"epoch": epoch, "train_loss": total / max(rows, 1), **s.evaluate(model, "val")}
        s.report(metrics, model=model, optimizer=opt)
        s.say(f"epoch {epoch}/{epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"))
