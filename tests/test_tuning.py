"""The whole-model fine-tune of grouped codes' scales: same bytes, closer outputs, nothing else touched."""

import pytest
import torch
from conftest import build_tiny

from aecompress.compress.choices import MethodChoice
from aecompress.compress.pipeline import check_tune
from aecompress.compress.tuning import checked_options, tune
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.selection import select_groups
from aecompress.data.calibration import collect
from aecompress.formats.substitute import decode_all, substituted
from aecompress.methods import compress


def _setup(method: str, options: dict):
    model = build_tiny("llama")
    torch.manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (8, 32))
    groups = select_groups(model, ["all"])
    stats = collect(model, groups, windows, what=("covariance",), cache_key=None)
    params = dict(model.named_parameters())
    rows = {g.name: torch.cat([m.view(params[m.param]).detach() for m in g.members]) for g in groups}
    forms = [compress(method, g, rows[g.name], Budget.of_ratio(32 / 3.5), stats[g.name], **options) for g in groups]
    return model, windows, forms


def _kl(model, forms, windows) -> float:
    with torch.no_grad():
        teacher = model(input_ids=windows).logits.log_softmax(-1)
        with substituted(model, decode_all(forms)):
            student = model(input_ids=windows).logits.log_softmax(-1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


@pytest.mark.parametrize("method,options", [
    ("compensated", {"group_size": 16, "fill": True}),
    ("compensated", {"group_size": 16, "zeros": "float", "grid": "minmax"}),
    ("quantize", {"group_size": 16, "dtype": "float16"}),
    ("quantize", {"dtype": "float16", "zeros": "int", "grid": "mse"}),
])
def test_tuning_brings_outputs_closer_at_the_same_bytes_changing_only_scales(method, options):
    model, windows, forms = _setup(method, options)
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = tune(model, forms, windows, steps=30, lr=0.01, top_k=16)
    assert _kl(model, tuned, windows) < 0.9 * _kl(model, forms, windows)
    for before, after in zip(forms, tuned):
        assert after.bytes == before.bytes and after.tensors.keys() == before.tensors.keys()
        assert after.meta["tuned_steps"] == 30 and after.method == before.method
        for key, value in before.tensors.items():
            assert after.tensors[key].dtype == value.dtype and after.tensors[key].shape == value.shape
            assert torch.equal(after.tensors[key], value) == (key not in ("scale", "zero")), key
    assert all(torch.equal(own[n], p) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_no_steps_and_untunable_forms_are_left_as_they_are():
    model, windows, forms = _setup("compensated", {"group_size": 16})
    assert tune(model, forms, windows, steps=0) == forms
    svd = [compress("svd", f.group, decode_all([f])[f.group], Budget.of_ratio(4.0)) for f in forms[:1]]
    assert tune(model, svd, windows, steps=5) == svd


def test_bad_tune_options_are_one_clear_error():
    for options, message in (({"step": 3}, "tune option 'step' is not one of: steps, lr, top_k"),
                             ({"lr": -1.0}, "tune lr -1.0 is not valid; it must be a positive float"),
                             ({"steps": 2.5}, "tune steps 2.5 is not valid; it must be an integer, 0 or more"),
                             ({"precision": "fp8"}, "tune precision 'fp8' is not valid; it must be one of 32-true"),
                             ({"top_k": 0}, "tune top_k 0 is not valid; it must be a positive integer or null")):
        with pytest.raises(AECompressError, match=message):
            checked_options(options)
    assert checked_options({"steps": 10, "lr": 1, "top_k": None}) == {"steps": 10, "lr": 1, "top_k": None}
    with pytest.raises(AECompressError, match="method 'svd' has no scales to tune; tune works on: quantize, compensated"):
        check_tune(MethodChoice("svd", tune={"steps": 3}))


def test_the_tune_shows_its_progress_with_an_eta_when_output_goes_to_a_file(capfd, monkeypatch):
    """On a cluster stderr is a file: the tune must leave readable progress lines there, not one bar redrawn."""
    from aecompress.core import progress

    model, windows, forms = _setup("compensated", {"group_size": 16})
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)  # the tiny tune is over in a second
    capfd.readouterr()
    tune(model, forms, windows, steps=4, lr=0.01, top_k=16)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tune: ")]
    assert [line.split(",")[0] for line in lines] == [f"tune: {k}/4 steps ({25 * k}%)" for k in (1, 2, 3, 4)], err
    assert all("elapsed 0:00:" in line and ", ETA 0:00:" in line and ", loss " in line for line in lines), err
    assert "tune (validation): 8/8 batches (100%)" in err  # the objective before and after, over every window
    assert "\r" not in err  # no bar redrawn in a file


def test_a_short_step_says_nothing_in_a_log_and_a_long_one_says_where_it_stands(capsys, monkeypatch):
    from aecompress.core import progress

    assert list(progress.progress(range(3), "quick", "group")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    shown = progress.Progress(4, "slow", "batch")
    shown.update()
    assert capsys.readouterr().err == "slow: 1/4 batches (25%), elapsed 0:00:10, ETA 0:00:30\n"
    assert shown.line(40.0) == "slow: 1/4 batches (25%), elapsed 0:00:40, ETA 0:02:00"


def test_a_benchmark_tune_on_several_processes_is_refused_in_one_line():
    from aecompress.compress.choices import MethodChoice
    from aecompress.compress.pipeline import closed_form
    from aecompress.core.budget import Budget
    from aecompress.core.errors import AECompressError

    with pytest.raises(AECompressError, match="tune devices 2: a benchmark tunes in one process"):
        closed_form(None, None, MethodChoice(method="compensated", tune={"steps": 2, "devices": 2}), [],
                    Budget.of_bits(3), None)


@pytest.mark.parametrize(("key", "value", "valid"), [("strategy", "fsdp", "auto, ddp"), ("accelerator", "tpu", "auto, cpu"),
                                                    ("devices", 0, "a positive int"), ("num_nodes", -1, "a positive int"),
                                                    ("timeout", 0, "a positive integer or null")])
def test_the_tunes_trainer_settings_are_checked_in_one_line(key, value, valid):
    from aecompress.compress.tuning import checked_options
    from aecompress.core.errors import AECompressError

    with pytest.raises(AECompressError, match=f"tune {key} {value!r} is not valid; it must be .*{valid}"):
        checked_options({key: value})


def test_a_ddp_tune_waits_as_long_as_it_is_told():
    """The other processes redo loading, calibration and compression before the tune; rank 0 waits ``timeout``."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from aecompress.compress.tuning import trainer_strategy

    strategy = trainer_strategy("ddp", 7200)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=7200)
    assert trainer_strategy("ddp", None) == "ddp" and trainer_strategy("auto", 7200) == "auto"
