"""The examples run end to end: each example's ``run(...)`` at a tiny size (a few steps on a
small slice of its real dataset), skipped with the loader's install message when the dataset
is missing."""
import math
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import char_transformer  # noqa: E402
import gcn_cora  # noqa: E402
import resnet_fashion_mnist  # noqa: E402
import rnn_ucr  # noqa: E402
import unet_denoise_fashion_mnist  # noqa: E402
from data import DatasetMissing  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")


def run_or_skip(module, *args, **kwargs):
    try:
        return module.run(*args, **kwargs)
    except DatasetMissing as e:
        pytest.skip(f"dataset missing: {e}")


def check_results(results, bits, metric, higher_is_better, capsys, module):
    assert [r["bits"] for r in results] == [None, *bits]
    assert results[0]["run"] == "float32"
    for r in results:
        assert r["metric"] == metric and r["higher_is_better"] is higher_is_better
        assert math.isfinite(r["value"]) and r["seconds"] > 0
        if higher_is_better:
            assert 0 <= r["value"] <= 100
    for r, b in zip(results[1:], bits):
        assert r["run"].startswith(f"W{b}A{b}G{b}") and r["groups"] == {4: 4, 6: 3, 8: 1}[b]
    capsys.readouterr()
    module.print_table(results)
    table = capsys.readouterr().out
    assert "float32" in table and f"W{bits[0]}A{bits[0]}G{bits[0]}" in table


@pytest.mark.parametrize("separable", [False, True], ids=["convs", "separable_convs"])
def test_resnet_fashion_mnist(separable, capsys):
    results = run_or_skip(resnet_fashion_mnist, [4], 1, 0, train_limit=64, test_limit=16, batch_size=16,
                          max_steps=3, widths=(4, 8, 8, 8), log_every=1, separable=separable)
    check_results(results, [4], "test acc %", True, capsys, resnet_fashion_mnist)
    assert results[0]["steps"] == 3
    groups = {m.groups for m in resnet_fashion_mnist.ResNet((1, 1, 1, 1), (4, 8, 8, 8), separable=separable).modules()
              if isinstance(m, torch.nn.Conv2d)}
    assert (groups != {1}) is separable


def test_unet_denoise_fashion_mnist(capsys):
    results = run_or_skip(unet_denoise_fashion_mnist, [4], 1, 0, train_limit=32, test_limit=8, batch_size=8,
                          max_steps=2, width=4, log_every=1, execution="integer")
    check_results(results, [4], "test PSNR dB", True, capsys, unet_denoise_fashion_mnist)
    assert all(r["value"] > 5 for r in results)          # the noisy inputs alone: ~13 dB


@pytest.mark.parametrize("attention, norm", [("sdpa", "layer"), ("matmul", "rms")])
def test_char_transformer(attention, norm, capsys):
    results = run_or_skip(char_transformer, [6], None, 0, steps=3, limit_chars=4000, batch_size=4, seq_len=16,
                          d_model=16, heads=2, layers=1, attention=attention, norm=norm, val_batches=2, log_every=1)
    check_results(results, [6], "val loss (nats/char)", False, capsys, char_transformer)
    for r in results:
        assert r["perplexity"] == pytest.approx(math.exp(r["value"]))
        assert r["value"] < 5.0           # ln(vocab ~ 60) = 4.1: no blow-up in 3 steps


@pytest.mark.parametrize("aggregation", ["index", "dense"])
def test_gcn_cora(aggregation, capsys):
    results = run_or_skip(gcn_cora, [6], 3, 0, num_nodes=400, aggregation=aggregation, log_every=1)
    check_results(results, [6], "test acc %", True, capsys, gcn_cora)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_ucr(cell, capsys):
    results = run_or_skip(rnn_ucr, [4], 1, 0, train_limit=10, test_limit=10, downsample_by=25, hidden=8,
                          cell=cell, batch_size=10, log_every=1)
    check_results(results, [4], "test acc %", True, capsys, rnn_ucr)


@pytest.mark.parametrize("module, loader", [(resnet_fashion_mnist, "fashion_mnist"), (char_transformer, "char_corpus"),
                                            (gcn_cora, "cora"), (rnn_ucr, "ucr")])
def test_missing_dataset_exits_with_the_install_hint(module, loader, monkeypatch):
    def missing(*args, **kwargs):
        raise DatasetMissing("the data set not found; install it with: apt-get install -y the-data")

    monkeypatch.setattr(module, loader, missing)
    with pytest.raises(SystemExit) as e:
        module.main([])
    assert "install it with: apt-get install -y the-data" in str(e.value)


def test_unknown_ucr_dataset_names_the_install_command():
    with pytest.raises(SystemExit) as e:
        rnn_ucr.main(["--dataset", "NoSuchSeries"])
    assert "pip install tslearn" in str(e.value)
