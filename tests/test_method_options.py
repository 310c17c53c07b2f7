"""Method options declared once (``explainrt.methods.options``): validation of every kind of value,
defaults, command-line text, the help and JSON descriptions, and README.md's table in sync."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from explainrt.errors import InvalidInputError
from explainrt.methods import METHODS, get_method, option_help, options_table, parse_text_options
from explainrt.methods.options import replace_table

README = Path(__file__).resolve().parent.parent / "README.md"


def _labels(value: Any) -> None:
    """A segmentation function, as LIME's ``segments`` takes."""


def _same(got: Any, want: Any) -> bool:
    """Equal values of the same type (arrays: same values and integer/float kind)."""
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype.kind == want.dtype.kind and np.array_equal(got, want)
    return type(got) is type(want) and got == want


GOOD = [  # (method, option, given, normalised value)
    ("rise", "n_masks", 16, 16),
    ("rise", "n_masks", np.int64(3), 3),
    ("rise", "p", 0.25, 0.25),
    ("rise", "p", np.float32(0.5), 0.5),
    ("rise", "seed", 2**64 - 1, 2**64 - 1),
    ("rise", "max_batch", None, None),
    ("rise", "memory_mb", 1, 1.0),
    ("smoothgrad", "noise", 0, 0.0),
    ("saliency", "abs", np.bool_(False), False),
    ("integrated-gradients", "rule", "riemann_left", "riemann_left"),
    ("integrated-gradients", "baseline", "blur", "blur"),
    ("integrated-gradients", "baseline", -1, -1.0),
    ("integrated-gradients", "baseline", [[[0.5]]], np.array([[[0.5]]])),
    ("occlusion", "window", 8, (8, 8)),
    ("occlusion", "window", [3, 8, 8], (3, 8, 8)),
    ("occlusion", "stride", np.array([4, 2]), (4, 2)),
    ("occlusion", "baseline", "blur", "blur"),
    ("occlusion", "incremental", True, True),
    ("occlusion", "incremental", np.bool_(False), False),
    ("occlusion", "incremental", "auto", "auto"),
    ("contrast-cam", "contrast", -3, -3),
    ("contrast-cam", "contrast", [1, 2, 3], np.array([1, 2, 3])),
    ("contrast-cam", "top_k", 2, 2),
    ("galore-counterfactual", "counter_image", "cat.png", "cat.png"),
    ("lime", "segments", "quickshift", "quickshift"),
    ("lime", "segments", {"algorithm": "slic", "n_segments": 10}, {"algorithm": "slic", "n_segments": 10}),
    ("lime", "segments", [[0, 1], [1, 0]], np.array([[0, 1], [1, 0]])),
    ("lime", "segments", _labels, _labels),
    ("lime", "baseline", "mean", "mean"),
    ("lime", "baseline", 0, 0.0),
    ("lime", "output", "logit", "logit"),
    ("kernelshap", "n_samples", None, None),
    ("ablationcam", "ablation_values", [[0.0, 1.0]], np.array([[0.0, 1.0]])),
    ("ablationcam", "ablation_values", _labels, _labels),
    ("fgvis", "game", "delete", "delete"),
    ("dff", "n_concepts", 1, 1),
]


@pytest.mark.parametrize(("method", "name", "given", "want"), GOOD,
                         ids=[f"{m}-{o}-{i}" for i, (m, o, _, _) in enumerate(GOOD)])
def test_good_values_are_normalised(method: str, name: str, given: Any, want: Any) -> None:
    got = get_method(method).check_options({name: given})[name]
    assert _same(got, want), (got, want)
    assert _same(get_method(method).option(name).parse(got), want)  # parsing a parsed value changes nothing


BAD = [  # (method, option, given, words the message must also hold)
    ("rise", "n_masks", 0, "an integer >= 1, got 0"),
    ("rise", "n_masks", 2.5, "got 2.5"),
    ("rise", "n_masks", True, "got True"),
    ("rise", "n_masks", "10", "got '10'"),
    ("rise", "n_masks", None, "got None"),
    ("rise", "p", 0, "a finite number in (0, 1), got 0"),
    ("rise", "p", 1.0, "got 1.0"),
    ("rise", "p", float("nan"), "got nan"),
    ("rise", "seed", -1, "an integer in 0..2^64 - 1, got -1"),
    ("rise", "memory_mb", 0, "a finite number > 0 or None, got 0"),
    ("smoothgrad", "noise", -0.1, "a finite number >= 0, got -0.1"),
    ("smoothgrad", "noise", float("inf"), "got inf"),
    ("lime", "kernel_width", 0, "a finite number > 0, got 0"),
    ("lime", "seed", 2**32, "an integer in 0..2^32 - 1"),
    ("lime", "n_samples", 1, "an integer >= 2, got 1"),
    ("saliency", "abs", "yes", "True or False, got 'yes'"),
    ("saliency", "abs", 1, "True or False, got 1"),
    ("integrated-gradients", "rule", "simpson", "one of 'riemann_trapezoid',"),
    ("integrated-gradients", "baseline", "noise", "a finite number, 'blur' or a numeric array [C, H, W], got 'noise'"),
    ("integrated-gradients", "baseline", np.zeros((4, 4)), "got a float64 array of shape (4, 4)"),
    ("integrated-gradients", "baseline", np.full((3, 2, 2), np.nan), "(it holds NaN or inf)"),
    ("occlusion", "window", (0, 8), "an integer, (h, w) or (c, h, w) of integers >= 1, got (0, 8)"),
    ("occlusion", "window", (8,), "got (8,)"),
    ("occlusion", "window", (1, 2, 3, 4), "got (1, 2, 3, 4)"),
    ("occlusion", "window", (8.0, 8), "got (8.0, 8)"),
    ("occlusion", "window", "8x8", "got '8x8'"),
    ("occlusion", "stride", 0, "or None, got 0"),
    ("occlusion", "baseline", "noise", "a finite number or 'blur', got 'noise'"),
    ("occlusion", "baseline", np.zeros((3, 4, 4)), "got a float64 array"),
    ("occlusion", "incremental", "never", "one of 'auto', True, False, got 'never'"),
    ("occlusion", "incremental", 1, "got 1"),
    ("contrast-cam", "contrast", 1.5, "a class index (-k: the k-th most likely) or one per image or None, got 1.5"),
    ("contrast-cam", "contrast", [[1, 2]], "got [[1, 2]]"),
    ("contrast-cam", "contrast", [], "got []"),
    ("contrast-cam", "contrast", ["a"], "got ['a']"),
    ("contrast-cam", "top_k", 0, "an integer >= 1 or None, got 0"),
    ("lime", "segments", "watershed", "got 'watershed'"),
    ("lime", "segments", {"algorithm": "watershed"}, "(unknown segmentation 'watershed')"),
    ("lime", "segments", np.zeros((4, 4)), "got a float64 array of shape (4, 4)"),
    ("lime", "segments", np.zeros(4, dtype=np.int64), "got a int64 array of shape (4,)"),
    ("lime", "baseline", "blur", "'mean' or a finite number, got 'blur'"),
    ("lime", "output", "loss", "one of 'probability', 'logit', got 'loss'"),
    ("ablationcam", "ablation_values", np.zeros(3), "a numeric array [n, C] or a function"),
    ("fgvis", "game", "hide", "one of 'preserve', 'delete', got 'hide'"),
    ("fgvis", "lr", 0, "a finite number > 0 or None, got 0"),
    ("fgvis", "lambda", -1, "a finite number >= 0 or None, got -1"),
    ("dff", "n_concepts", 0, "an integer >= 1, got 0"),
]


@pytest.mark.parametrize(("method", "name", "given", "words"), BAD,
                         ids=[f"{m}-{o}-{i}" for i, (m, o, _, _) in enumerate(BAD)])
def test_bad_values_name_method_option_value_and_what_is_allowed(method: str, name: str, given: Any,
                                                                 words: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        get_method(method).check_options({name: given})
    message = str(caught.value)
    assert message.startswith(f"method {method!r}: {name} must be {get_method(method).option(name).allowed()}, got ")
    assert words in message


def test_unknown_options_are_named_with_the_ones_taken() -> None:
    with pytest.raises(InvalidInputError, match=r"^method 'rise' takes no option\(s\) masks, size; it takes n_masks, "
                                                r"grid, p, seed, max_batch, memory_mb$"):
        get_method("rise").check_options({"size": 3, "masks": 4})
    with pytest.raises(InvalidInputError, match=r"^method 'gradcam' takes no option\(s\) window; it takes none$"):
        get_method("gradcam").option("window")


def test_defaults_are_the_values_the_methods_use() -> None:
    assert get_method("rise").check_options({}) == {"n_masks": 500, "grid": 7, "p": 0.5, "seed": 0,
                                                     "max_batch": None, "memory_mb": None}
    assert get_method("occlusion").check_options({"stride": [8, 8]}) == {
        "window": (16, 16), "stride": (8, 8), "baseline": 0.0, "incremental": "auto", "max_batch": None,
        "memory_mb": None}
    assert get_method("integrated-gradients").check_options({}) == {"baseline": 0.0, "steps": 50,
                                                                     "rule": "gausslegendre"}
    assert get_method("smoothgrad").check_options({}) == {"n_samples": 25, "noise": 0.15, "seed": 0, "squared": False}
    assert get_method("saliency").check_options({}) == {"abs": True, "multiply_by_input": False}
    assert get_method("dff").check_options({}) == {"n_concepts": 5}
    assert get_method("contrast-cam").check_options({}) == {"contrast": None, "top_k": None}
    lime = get_method("lime").check_options({})
    assert lime == {"n_samples": 1000, "segments": "slic", "seed": 0, "baseline": "mean", "num_features": None,
                    "output": "probability", "max_batch": None, "memory_mb": None, "kernel_width": 0.25, "alpha": 1.0}
    assert get_method("kernelshap").check_options({})["n_samples"] is None
    assert get_method("gradcam").check_options({}) == {}


def test_fgvis_lambda_and_lr_default_by_game() -> None:
    fgvis = get_method("fgvis")
    preserve = fgvis.check_options({})
    assert (preserve["game"], preserve["lambda"], preserve["lr"], preserve["steps"]) == ("preserve", 0.1, 0.1, 200)
    delete = fgvis.check_options({"game": "delete"})
    assert (delete["lambda"], delete["lr"]) == (0.0, 1.0)
    assert fgvis.check_options({"game": "delete", "lambda": 0.5})["lambda"] == 0.5


def test_contrast_and_top_k_exclude_each_other() -> None:
    with pytest.raises(InvalidInputError, match="^method 'contrast-cam': give contrast .* not both$"):
        get_method("contrast-cam").check_options({"contrast": 1, "top_k": 2})


@pytest.mark.parametrize("method", list(METHODS))
def test_declared_defaults_pass_their_own_parse_and_checking_twice_changes_nothing(method: str) -> None:
    chosen = get_method(method)
    names = [option.name for option in chosen.options]
    assert len(names) == len(set(names)) and all(name.isidentifier() for name in names)
    for option in chosen.options:
        assert option.help and not option.help.endswith(".")
        assert _same(option.parse(option.default, method), option.default), option.name
    checked = chosen.check_options({})
    again = chosen.check_options(checked)
    assert list(again) == names and all(_same(again[name], checked[name]) for name in names)


def test_per_image_and_image_options_come_from_the_declarations() -> None:
    assert get_method("contrast-cam").per_image_options == ("contrast",)
    assert get_method("galore-counterfactual").per_image_options == ("counter_class",)
    assert get_method("galore-counterfactual").image_options == ("counter_image",)
    assert get_method("lime").per_image_options == get_method("kernelshap").per_image_options == ("segments",)
    assert get_method("rise").per_image_options == get_method("rise").image_options == ()


TEXT = [  # (method, option, command-line text, value)
    ("rise", "n_masks", "2000", 2000),
    ("rise", "p", "0.25", 0.25),
    ("rise", "max_batch", "8", 8),
    ("saliency", "abs", "false", False),
    ("saliency", "abs", "True", True),
    ("occlusion", "window", "32,32", (32, 32)),
    ("occlusion", "window", "[32, 32]", (32, 32)),
    ("occlusion", "window", "(3, 8, 8)", (3, 8, 8)),
    ("occlusion", "window", "16", (16, 16)),
    ("occlusion", "incremental", "true", True),
    ("occlusion", "incremental", "auto", "auto"),
    ("occlusion", "baseline", "blur", "blur"),
    ("occlusion", "baseline", "0.5", 0.5),
    ("integrated-gradients", "baseline", "[[[0.0, 1.0]]]", np.array([[[0.0, 1.0]]])),
    ("integrated-gradients", "rule", '"riemann_left"', "riemann_left"),
    ("integrated-gradients", "rule", "riemann_middle", "riemann_middle"),
    ("lime", "segments", "slic", "slic"),
    ("lime", "segments", '{"algorithm": "quickshift", "ratio": 0.5}', {"algorithm": "quickshift", "ratio": 0.5}),
    ("lime", "segments", "[[0, 1], [1, 0]]", np.array([[0, 1], [1, 0]])),
    ("lime", "baseline", "mean", "mean"),
    ("lime", "baseline", "-1", -1.0),
    ("contrast-cam", "contrast", "-3", -3),
    ("contrast-cam", "contrast", "[4]", np.array([4])),
    ("contrast-cam", "contrast", "1,2", np.array([1, 2])),
    ("galore-counterfactual", "counter_image", "cat.png", "cat.png"),
]


@pytest.mark.parametrize(("method", "name", "text", "want"), TEXT,
                         ids=[f"{m}-{o}-{i}" for i, (m, o, _, _) in enumerate(TEXT)])
def test_command_line_text_is_read_by_the_declared_kind(method: str, name: str, text: str, want: Any) -> None:
    got = get_method(method).option(name).parse_text(text, method)
    assert _same(got, want), (got, want)


BAD_TEXT = [
    ("rise", "n_masks", "many"),
    ("rise", "n_masks", "2.5"),
    ("rise", "p", "1.5"),
    ("saliency", "abs", "yes"),
    ("occlusion", "window", "8x8"),
    ("occlusion", "incremental", "maybe"),
    ("lime", "segments", "{bad json"),
    ("ablationcam", "ablation_values", "lambda a: a"),
]


@pytest.mark.parametrize(("method", "name", "text"), BAD_TEXT, ids=[f"{m}-{o}" for m, o, _ in BAD_TEXT])
def test_bad_command_line_text_names_method_and_option(method: str, name: str, text: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^method {method!r}: {name} must be "):
        get_method(method).option(name).parse_text(text, method)


def test_parse_text_options_reads_every_pair_and_rejects_unknown_names() -> None:
    rise = get_method("rise")
    assert parse_text_options(rise, [("n_masks", "100"), ("p", "0.3")]) == {"n_masks": 100, "p": 0.3}
    with pytest.raises(InvalidInputError, match=r"^method 'rise' takes no option\(s\) window; it takes n_masks"):
        parse_text_options(rise, [("window", "8,8")])


def test_option_help_has_one_line_per_option_with_default_and_allowed_values() -> None:
    lines = option_help(get_method("rise"))
    assert len(lines) == len(get_method("rise").options)
    assert lines[0].startswith("n_masks    number of random masks (500: seconds on a CPU") and "Default 500; accepts an integer >= 1." in lines[0]
    assert lines[2] == "p          probability of keeping a cell. Default 0.5; accepts a finite number in (0, 1)."
    assert option_help(get_method("gradcam")) == ["no options"]


def test_descriptions_are_json_with_name_first() -> None:
    for method in METHODS.values():
        for option in method.options:
            described = option.describe()
            assert next(iter(described)) == "name" and described["name"] == option.name
            json.dumps(described)
    window, _, baseline, incremental, max_batch, _ = (o.describe() for o in get_method("occlusion").options)
    assert window["default"] == [16, 16] and window["type"] == "size"
    assert incremental["choices"] == ["auto", True, False] and incremental["default"] == "auto"
    assert baseline["any_of"] == [{"type": "float"}, {"type": "str", "choices": ["blur"]}]
    assert (max_batch["type"], max_batch["minimum"], max_batch["default"]) == ("int", 1, None)
    p = get_method("rise").option("p").describe()
    assert (p["minimum"], p["minimum_exclusive"], p["maximum"], p["maximum_exclusive"]) == (0, True, 1, True)


def test_readme_table_matches_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    assert replace_table(text, options_table()) == text, (
        "README.md's method table differs from the method option declarations; regenerate it from the "
        "repository root with: python -c 'from explainrt.methods import sync_readme; sync_readme(\"README.md\")'")


def test_readme_table_lists_every_method_option_and_default() -> None:
    table = options_table()
    for method in METHODS.values():
        assert f"| `{method.name}` |" in table
        for option in method.options:
            assert f"| | `{option.name}` | {option.kind.type_name} | `{option.default!r}` |" in table


def test_replacing_the_table_keeps_the_rest_and_needs_the_markers() -> None:
    text = "intro\n\n  <!-- methods:start -->\n  old\n  <!-- methods:end -->\n\nrest\n"
    assert replace_table(text, "| a |\n| b |\n") == ("intro\n\n  <!-- methods:start -->\n  | a |\n  | b |\n"
                                                     "  <!-- methods:end -->\n\nrest\n")
    with pytest.raises(InvalidInputError, match="methods:start"):
        replace_table("no table here\n", "| a |\n")
