"""Fine-tune the base model on a labelled task: the "expensive" step that an ESM stands in for."""

import copy
from dataclasses import dataclass

import numpy as np

from .embed import import_torch
from .errors import ESMIndexError


@dataclass
class FinetuneConfig:
    """The paper's settings: 3 epochs, AdamW lr 2e-5, weight decay 0.01, batch 32, linear decay."""

    epochs: float = 3.0
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0


def label_targets(labels, regression):
    """Training targets: class indices (classification) or float rows (regression), and the head's width."""
    if regression:
        targets = np.asarray(labels, dtype=np.float32).reshape(len(labels), -1)
        return targets, targets.shape[1]
    _, indices = np.unique(labels, return_inverse=True)
    return indices.astype(np.int64), int(indices.max()) + 1


def finetune(encoder, task, config=None, model=None, progress=None):
    """Train a copy of `model` (default: the encoder's base model) with a linear head on `task`.

    Returns (model, head). The head is a `torch.nn.Linear` on the pooled embedding; cross-entropy for
    classes, MSE for regression. `progress` is called with the fraction of steps done.
    """
    torch = import_torch()
    config = config or FinetuneConfig()
    encoder._load()
    if len(task) < 2:
        raise ESMIndexError("fine-tuning needs at least two examples")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = copy.deepcopy(encoder.model_ if model is None else model).train()
    targets, width = label_targets(task.labels, task.regression)
    head = torch.nn.Linear(encoder.dim, width)
    parameters = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(task) // config.batch_size)
    total = max(1, round(config.epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    loss_fn = torch.nn.MSELoss() if task.regression else torch.nn.CrossEntropyLoss()
    step = 0
    while step < total:
        order = rng.permutation(len(task))
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            pooled = encoder.embed_batch(model, [task.texts[i] for i in batch])
            loss = loss_fn(head(pooled), torch.as_tensor(targets[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if progress:
                progress(step / total)
            if step >= total:
                break
    return model.eval(), head.eval()
