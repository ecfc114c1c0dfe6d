"""engine: the weight average, the progress bar, the loops on one batch."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import quiet

from bloodcell.models import get_model
from bloodcell.training.engine import (
    EMA,
    FitState,
    Step,
    fit,
    make_optimizer,
    make_scheduler,
    progress_bar,
)


def _hand_ema(start: dict, steps: list[dict], decay: float) -> dict:
    """The textbook EMA of state dicts: e <- decay * e + (1 - decay) * w, from the start weights."""
    e = {k: v.clone() for k, v in start.items() if v.dtype.is_floating_point}
    for w in steps:
        for k in e:
            e[k] = decay * e[k] + (1 - decay) * w[k]
    return e


def test_ema_is_the_textbook_average_from_the_first_step() -> None:
    torch.manual_seed(0)
    model = get_model("cnn2x32", num_classes=4, image_size=32)
    start = copy.deepcopy(model.state_dict())
    ema = EMA(model, decay=0.9)
    steps = []
    for _ in range(3):  # change every weight and BN statistic, as training steps would
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.dtype.is_floating_point:
                    t.add_(torch.randn_like(t))
        steps.append(copy.deepcopy(model.state_dict()))
        ema.update(model)
    want = _hand_ema(start, steps, 0.9)
    got = ema.model.state_dict()
    assert set(want) <= set(got)  # the averaged network keeps the model's own key names
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    k = next(iter(want))
    assert not torch.allclose(got[k], model.state_dict()[k])  # it lags the model


def test_disabled_progress_bar_writes_nothing(capsys) -> None:
    bar = progress_bar(5, "epoch 1/1", enabled=False)
    for _ in range(5):
        bar.update()
    bar.close()
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_in_a_log(monkeypatch) -> None:
    for stream, shown in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        bar = progress_bar(4, "epoch 2/3", enabled=True)
        for _ in range(4):
            bar.update()
        assert bar.n == 4
        bar.close()
        # a terminal sees the bar at once; a log sees nothing of an epoch shorter than 30 s
        assert ("epoch 2/3" in stream.getvalue()) is shown


class _Loader:
    """One fixed batch per epoch, as a BatchLoader would give."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self.x, self.y


def test_fit_on_one_batch_learns_and_saves_each_epoch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    model = get_model("cnn2x32", num_classes=2, image_size=32, dropout=0.0)
    opt = make_optimizer(model, "adamw", 3e-3, 0.0, 0.9)
    step = Step(opt, make_scheduler(opt, "constant", 20, 0), torch.device("cpu"), channels_last=False)
    saved = {"last": 0, "best": 0}

    def val_metrics(labels, probs):
        return {"loss": float(-torch.log(torch.tensor(probs[range(len(labels)), labels])).mean()),
                "accuracy": float((probs.argmax(1) == labels).mean()), "macro_f1": 0.0}

    state = fit(model, _Loader(x, y), _Loader(x, y), step, epochs=20, monitor="val_loss", patience=0, seed=0,
                state=FitState(), val_metrics=val_metrics,
                save_last=lambda s: saved.__setitem__("last", saved["last"] + 1),
                save_best=lambda s: saved.__setitem__("best", saved["best"] + 1), log=quiet, progress=False)
    assert state.epoch == 20 and saved["last"] == 20 and 1 <= saved["best"] <= 20
    assert state.history[-1]["val_loss"] < state.history[0]["val_loss"] / 2  # it learned the batch


def test_pretrained_backbone_learns_slower_and_waits_out_the_freeze() -> None:
    """Head at lr, backbone at backbone_lr x lr; the backbone at 0 while frozen, then warming up;
    a frozen step moves the head and leaves every backbone weight as it was."""
    torch.manual_seed(0)
    model = get_model("cnn2x32", num_classes=3, image_size=32)
    head = {"classifier.4.weight", "classifier.4.bias"}
    opt = make_optimizer(model, "adamw", 1e-2, 0.05, 0.9, head=head, backbone_lr=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["backbone"] for g in opt.param_groups] == [False, False, True, True]
    for g in opt.param_groups:
        assert all((names[id(p)] in head) != g["backbone"] for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = make_scheduler(opt, "constant", total_steps=20, warmup_steps=2, freeze_steps=3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 / 3, 1e-2 / 3, 0.0, 0.0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in head), n
    lrs = []
    for _ in range(8):
        sched.step()
        lrs.append((opt.param_groups[0]["lr"], opt.param_groups[2]["lr"]))
    assert [b for _, b in lrs[:2]] == [0.0, 0.0]  # steps 1, 2: still frozen
    assert lrs[2][1] == pytest.approx(1e-3 / 3) and lrs[3][1] == pytest.approx(2e-3 / 3)  # warming up
    assert lrs[-1] == pytest.approx((1e-2, 1e-3))  # then the schedule: backbone at 0.1 x the head


def test_without_a_head_the_optimizer_is_as_before() -> None:
    model = get_model("cnn2x32", num_classes=3, image_size=32)
    opt = make_optimizer(model, "sgd", 0.1, 0.05, 0.9)
    assert [(g["lr"], g["weight_decay"], g["backbone"]) for g in opt.param_groups] == [
        (0.1, 0.05, False), (0.1, 0.0, False)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn4x32", "resnet18"])
def test_scoring_in_onnx_runtime_gives_pytorch_s_probabilities(name) -> None:
    """Many images on the CPU in fp32 are scored in ONNX Runtime (auto), a few or bf16 in PyTorch;
    both give the same probabilities, TTA included."""
    import numpy as np

    from bloodcell.data import BatchLoader, Split
    from bloodcell.training.engine import (
        ONNX_MIN_IMAGES,
        onnx_scorer,
        predict_probs,
        scoring_backend,
    )

    torch.manual_seed(0)
    model = get_model(name, num_classes=4, image_size=32)
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    n = 150
    split = Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, n), np.arange(n),
                  [f"{i}.png" for i in range(n)])
    cpu = torch.device("cpu")
    assert scoring_backend("auto", cpu, "fp32", n * 8) == ("onnx" if n * 8 >= ONNX_MIN_IMAGES else "torch")
    assert scoring_backend("auto", cpu, "bf16", 10**6) == "torch" and scoring_backend("auto", cpu, "fp32", 10) == "torch"
    assert onnx_scorer(model, 32) is not None  # it exports: "onnx" below is ONNX Runtime, not a fallback
    for tta in (False, True):
        loader = BatchLoader(split, 64)
        fast, y1 = predict_probs(model, loader, cpu, tta=tta, backend="onnx")
        slow, y2 = predict_probs(model, loader, cpu, tta=tta, backend="torch")
        assert np.array_equal(y1, y2) and fast.shape == (n, 4)
        np.testing.assert_allclose(fast, slow, atol=1e-5)
        assert np.abs(fast - 0.25).max() > 0.01  # not a flat answer: the comparison can fail
