import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sqcompile
from sqcompile.config import OP_NAMES, Config, pattern_matches


def test_defaults():
    c = Config()
    assert (c.weight_bits, c.act_bits, c.grad_bits, c.groups) == (4, 4, 4, None)
    assert c.for_module("fc").groups == 4 and c.grad_outer_scale and c.unsigned_acts
    assert c.norm == "l1" and c.norm_bits == 8 and c.execution == "auto" and c.kernels == "auto"
    assert math.isclose(c.l1_scale, math.sqrt(math.pi / 2))


@pytest.mark.parametrize("name,value", [
    ("weight_bits", 1), ("weight_bits", 9), ("act_bits", 0), ("grad_bits", 16), ("grad_bits", 4.0),
    ("norm_bits", 1), ("weight_bits", True), ("groups", 0), ("groups", 9), ("groups", -1),
    ("norm", "l2"), ("execution", "fast"), ("kernels", "cuda"), ("inner", "tvm"),
    ("l1_scale", 0.0), ("l1_scale", float("nan")), ("collect_stats", "yes"), ("cudagraphs", 1), ("fusion", 1), ("fusion", "off"),
])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(ValueError, match=repr(name)):
        Config.from_options({name: value})


@pytest.mark.parametrize("other", [{"inner": "eager"}, {"collect_stats": True}])
def test_cudagraphs_refuses_what_cannot_be_captured(other):
    with pytest.raises(ValueError, match="'cudagraphs'"):
        Config.from_options({"cudagraphs": True, **other})
    Config.from_options({"cudagraphs": True, "inner": "inductor"})   # fine


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'weight_bits'"):
        Config.from_options({"weigth_bits": 4})
    with pytest.raises(ValueError, match="unknown sqcompile option 'frobnicate'"):
        Config.from_options({"frobnicate": 1})
    with pytest.raises(ValueError, match=r"'weight_bit' in Config\(\.\.\.\); did you mean 'weight_bits'"):
        Config(weight_bit=4)         # not the dataclass's TypeError


@pytest.mark.parametrize("bits,groups", [(2, 4), (4, 4), (5, 4), (6, 3), (7, 2), (8, 1)])
def test_default_groups_are_the_most_that_fit_int8(bits, groups):
    """``groups=None`` (the default) resolves per op, from its own ``grad_bits``: the most
    groups, up to 4, whose expanded integers ``qmax << (G - 1)`` fit int8 (checked here
    against the integers themselves), so no backward GEMM needs int16 digits."""
    qmax = 2 ** (bits - 1) - 1
    assert qmax << (groups - 1) <= 127 and (groups == 4 or qmax << groups > 127)
    assert Config(grad_bits=bits).for_module("fc").groups == groups
    c = Config(overrides={"head": {"grad_bits": bits}, "fixed": {"grad_bits": bits, "groups": 2}})
    assert c.for_module("head.proj").groups == groups and c.for_module("body").groups == 4
    assert c.for_module("fixed").groups == 2                          # given: kept, int16 or not
    assert Config(grad_bits=bits, groups=5).for_module("fc").groups == 5


def test_override_values_are_validated():
    with pytest.raises(ValueError, match=r"'grad_bits': got 12.*\(in overrides\['fc'\]\)"):
        Config(overrides={"fc": {"grad_bits": 12}})
    with pytest.raises(ValueError, match=r"overrides\['fc'\]"):
        Config(overrides={"fc": {"overrides": {}}})   # not a per-op option
    with pytest.raises(ValueError, match="'overrides'"):
        Config(overrides=["fc"])


def test_overrides_resolution():
    c = Config(weight_bits=4, overrides={"layer1": {"weight_bits": 8}, "layer1.0.conv2": {"act_bits": 6},
                                         "fc": None, "": {"grad_bits": 8}})
    assert c.for_module("layer1.0.conv1").weight_bits == 8          # parent pattern covers children
    both = c.for_module("layer1.0.conv2")
    assert (both.weight_bits, both.act_bits) == (8, 6)              # later patterns add fields
    assert c.for_module("layer2.0.conv1").weight_bits == 4
    assert c.for_module("fc") is None                                # None = keep float
    assert c.for_module("").grad_bits == 8                          # "" = ops of the root module
    assert c.for_module("layer2").grad_bits == 4
    assert pattern_matches("blocks.*.attn", "blocks.3.attn.q_proj")
    assert not pattern_matches("fc", "fc2")


def test_overrides_select_ops_by_name():
    attn_float = Config(overrides={"*:scaled_dot_product_attention": None})
    assert attn_float.for_module("blocks.0", "scaled_dot_product_attention") is None
    assert attn_float.for_module("", "scaled_dot_product_attention") is None     # "*" covers the root too
    assert attn_float.for_module("blocks.0", "linear") is not None
    assert attn_float.for_module("blocks.0") is not None                         # no op: module patterns only

    linear_only = Config(overrides={"*": None, "*:linear": {}})
    assert linear_only.for_module("blocks.0.fc1", "linear").weight_bits == 4
    assert linear_only.for_module("blocks.0", "matmul") is None

    c = Config(overrides={"layer1:conv*": {"weight_bits": 8}, "layer1:linear": {"act_bits": 6}})
    assert c.for_module("layer1.0.conv1", "conv2d").weight_bits == 8
    assert c.for_module("layer1.0.conv1", "conv2d").act_bits == 4
    assert c.for_module("layer1.fc", "linear").weight_bits == 4
    assert c.for_module("layer2.0.conv1", "conv2d").weight_bits == 4
    # the module part decides whether a pattern matches any module of a graph
    assert c.unmatched_overrides(["layer1", "layer1.0.conv1", ""]) == []
    assert c.unmatched_overrides(["layer2", ""]) == ["layer1:conv*", "layer1:linear"]


def test_override_op_patterns_are_validated():
    with pytest.raises(ValueError, match=r"overrides\['\*:sdpa'\].*scaled_dot_product_attention"):
        Config(overrides={"*:sdpa": None})
    with pytest.raises(ValueError, match="did you mean 'linear'"):
        Config(overrides={"*:linaer": {"weight_bits": 8}})
    with pytest.raises(ValueError, match=r"overrides\['fc:'\]"):
        Config(overrides={"fc:": None})


def test_op_names_are_the_ops_the_passes_rewrite():
    import importlib
    gemms, norms = (importlib.import_module(f"sqcompile.passes.{m}") for m in ("quantize_gemms", "l1_norms"))
    assert set(OP_NAMES) == set(gemms.GEMM_NAMES) | set(norms._NORMS)
    assert len(OP_NAMES) == len(set(OP_NAMES))


def test_config_passes_through_and_combines():
    c = Config(weight_bits=8)
    assert Config.from_options(c) is c
    merged = Config.from_options({"config": c, "act_bits": 6})
    assert (merged.weight_bits, merged.act_bits) == (8, 6)


def test_torch_compile_bad_option_is_a_value_error_at_first_call():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="shiftquant", options={"grad_bits": 1})
    with pytest.raises(ValueError, match="'grad_bits'"):
        compiled(torch.randn(2, 4))
    torch._dynamo.reset()
    # nothing was lost: the model still works
    assert model(torch.randn(2, 4)).shape == (2, 4)


@pytest.mark.parametrize("mode, cudagraphs", [("reduce-overhead", True), ("max-autotune", True),
                                              ("max-autotune-no-cudagraphs", False)])
def test_torch_compile_mode_means_cuda_graphs_or_nothing(mode, cudagraphs):
    """``torch.compile(..., mode=...)`` (torch hands it to a custom backend as a keyword, not in
    ``options``): Inductor's CUDA-graph modes turn on ``cudagraphs``, the others change nothing."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    torch.compile(model, backend="shiftquant", mode=mode)(torch.randn(3, 4)).sum().backward()
    record = sqcompile.report(model).records[-1]
    assert record.config.cudagraphs is cudagraphs
    assert record.config.weight_bits == Config().weight_bits


def test_torch_compile_unknown_mode_is_a_value_error_naming_it():
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="mode='fastest'.*reduce-overhead"):
        torch.compile(model, backend="shiftquant", mode="fastest")(torch.randn(2, 4))
    torch._dynamo.reset()
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_unmatched_override_warns_with_the_pattern():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    compiled = torch.compile(model, backend="shiftquant", options={"overrides": {"classifier": None}})
    with pytest.warns(UserWarning, match="'classifier'.*match no module"):
        compiled(torch.randn(3, 4))


@pytest.mark.parametrize("key, warns", [("0:conv2d", True), ("*:conv*", True), ("*:linear", False),
                                        ("2:lin*", False)])
def test_an_op_pattern_that_matches_no_op_of_its_modules_warns(key, warns):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    compiled = torch.compile(model, backend="shiftquant", options={"overrides": {key: None}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(3, 4))
    found = [str(w.message) for w in caught if "none of their ops" in str(w.message)]
    assert bool(found) == warns and (not warns or repr(key) in found[0])


def test_on_off_environment_variables_refuse_other_values(monkeypatch):
    """``SQCOMPILE_FUSION=disable`` left fusion on; a typo in such a variable is an error
    naming it (at import for the variables read then)."""
    from sqcompile.config import env_flag

    for value, expected in (("0", False), ("off", False), ("YES", True), (" 1 ", True)):
        monkeypatch.setenv("SQCOMPILE_SOMETHING", value)
        assert env_flag("SQCOMPILE_SOMETHING", True, "") is expected
    monkeypatch.delenv("SQCOMPILE_SOMETHING")
    assert env_flag("SQCOMPILE_SOMETHING", False, "") is False
    run = subprocess.run([sys.executable, "-c", "import sqcompile"], capture_output=True, text=True,
                         env={**os.environ, "SQCOMPILE_FUSION": "disable"})
    assert run.returncode != 0 and "SQCOMPILE_FUSION='disable'" in run.stderr


def test_config_is_exported():
    assert sqcompile.Config is Config
