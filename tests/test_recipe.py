"""The training recipe's building blocks: length-grouped batches, a fixed step count, pre-tokenised text, linear
probes and probe-initialised heads (LP-FT)."""

from __future__ import annotations

import torch
from torch import nn

from svfit.train.loop import LengthGroupedBatches, OptimConfig, fit
from svfit.train.probe import fit_logistic


def test_length_grouped_batches_cover_every_example_once_per_epoch_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 80, (1003,), generator=g).tolist()
    sampler = LengthGroupedBatches(lengths, batch_size=16, seed=3, window=10)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 63
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert all(len(b) == 16 for b in batches[:-1])  # the one short batch comes last
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert padded < 1.1 * sum(lengths)  # plain shuffling pads to ~1.9x here
    assert epochs[0] != epochs[1]  # each epoch reshuffles
    assert list(LengthGroupedBatches(lengths, 16, seed=3, window=10)) == epochs[0]  # seeded


def test_fit_runs_a_fixed_number_of_steps_across_epochs_with_length_batches():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = [(torch.randn(4), i % 2) for i in range(10)]

    def collate(rows):
        return {"x": torch.stack([x for x, _ in rows]), "labels": torch.tensor([y for _, y in rows])}

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["x"]), batch["labels"])

    scores = []
    log = fit(model, data, collate, loss_fn, OptimConfig(lr=1e-2, head_lr=1e-2), epochs=1.0, batch_size=4, seed=0,
              is_head=lambda n: False, progress=False, max_steps=7, lengths=list(range(10)),
              evaluate=lambda m: scores.append(1) or {"accuracy": 0.5, "loss": 1.0}, eval_every=3)
    assert log.steps == 7 and log.examples == 4 + 4 + 2 + 4 + 4 + 2 + 4  # 3 batches per epoch, the third short
    assert [e["step"] for e in log.eval_curve] == [0, 3, 6, 7]


def test_logistic_probe_is_a_linear_head_on_the_raw_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    centres = torch.randn(3, 8, generator=g) * 3
    x = centres[y] + torch.randn(600, 8, generator=g)
    x = x * torch.tensor([1e-3, 1, 10, 1, 1, 1, 1, 100.0]) + 5  # badly scaled features: standardised inside
    weight, bias = fit_logistic(x, y, 3, l2=1e-4)
    assert weight.shape == (3, 8) and bias.shape == (3,)
    assert ((x @ weight.T + bias).argmax(-1) == y).float().mean() > 0.95
    strong, _ = fit_logistic(x, y, 3, l2=10.0)
    assert strong.norm() < weight.norm()  # the penalty shrinks the weights


def test_prepared_text_batches_equal_raw_text_batches():
    from svfit.tasks import get_task

    task = get_task("sentiment")
    train, _ = task.load_data(0, 12, 1)
    raw = task.collate(train)
    prepared = task.prepare(train)
    assert [y for _, y in prepared] == [y for _, y in train]
    assert task.example_length(prepared[0]) == len(prepared[0][0])
    batch = task.collate(prepared)
    for key in raw:
        assert torch.equal(raw[key], batch[key]), key


def test_lm_task_scores_one_answer_token_from_left_padded_prompts():
    from svfit.tasks import get_task

    task = get_task("lm-sentiment")
    assert len(task.answer_ids) == 2 and task.answer_ids[0] != task.answer_ids[1]
    batch = task.collate(task.prepare([("Great.", 1), ("A long, dull and tiresome film.", 0)]))
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # the last position is every prompt's end
    assert batch["attention_mask"][0, 0] == 0 and batch["labels"].tolist() == [1, 0]


def test_a_probe_head_is_loaded_into_the_new_head_with_its_input_dropout_off(tmp_path):
    from svfit.tasks import get_task
    from svfit.train.probe import Probe, load_head, save_head

    task = get_task("fashion")
    model = task.load_model()
    weight, bias = torch.randn(10, 1280), torch.randn(10)
    save_head(Probe("f", 1e-3, weight, bias, 0.5, 0.5, [1], {1e-3: 0.5}), tmp_path / "head.safetensors")
    assert task.head_dropout(model).p > 0
    load_head(model, task, tmp_path / "head.safetensors")
    assert torch.equal(task.head_linear(model).weight, weight) and torch.equal(task.head_linear(model).bias, bias)
    assert task.head_dropout(model).p == 0.0  # dropped features would shift the probe's logits
