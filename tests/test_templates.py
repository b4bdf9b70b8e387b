"""Tests for sail/eval/templates.py: built-in prompt sets, ImageNet class names, file loading."""

from collections import defaultdict

import pytest

from sail.core.errors import SailError
from sail.eval.templates import (
    IMAGENET_CLASSNAMES,
    IMAGENET_TEMPLATES,
    TEMPLATES,
    check_template,
    load_classnames,
    load_templates,
)


def test_imagenet_templates_are_clips_80():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    # First and last row of Table 4's ImageNet block, read left to right.
    assert IMAGENET_TEMPLATES[:4] == [
        "a bad photo of a {}.",
        "a photo of many {}.",
        "a sculpture of a {}.",
        "a photo of the hard to see {}.",
    ]
    assert IMAGENET_TEMPLATES[-4:] == [
        "itap of my {}.",
        "a photo of a cool {}.",
        "a photo of a small {}.",
        "a tattoo of the {}.",
    ]
    assert "a jpeg corrupted photo of the {}." in IMAGENET_TEMPLATES
    assert TEMPLATES["imagenet"] is IMAGENET_TEMPLATES


def test_every_builtin_template_has_exactly_one_placeholder():
    for name, templates in TEMPLATES.items():
        assert templates, name
        for template in templates:
            assert template.count("{}") == 1, (name, template)
            filled = template.format("zebra")
            assert "zebra" in filled and "{" not in filled and "}" not in filled
            assert "{label}" not in template


def test_per_dataset_sets_match_table_4():
    counts = {name: len(templates) for name, templates in TEMPLATES.items()}
    assert counts == {
        "cifar10": 18, "cifar100": 18, "food101": 1, "caltech101": 34, "stanford_cars": 8,
        "dtd": 8, "fgvc_aircraft": 2, "flowers102": 1, "pets": 1, "sun397": 2, "imagenet": 80,
    }
    assert TEMPLATES["cifar10"] == TEMPLATES["cifar100"]
    assert TEMPLATES["food101"] == ["a photo of {}, a type of food."]
    assert TEMPLATES["flowers102"] == ["a photo of a {}, a type of flower."]
    assert TEMPLATES["pets"] == ["a photo of a {}, a type of pet."]
    assert TEMPLATES["sun397"] == ["a photo of a {}.", "a photo of the {}."]
    assert TEMPLATES["fgvc_aircraft"] == [
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    ]
    assert TEMPLATES["stanford_cars"][3] == "i love my {}!"
    assert TEMPLATES["dtd"][-1] == "a photo of the {} object."
    assert TEMPLATES["cifar10"][0] == "a photo of a {}."
    assert TEMPLATES["cifar10"][-1] == "a photo of the big {}."
    assert TEMPLATES["caltech101"][10] == "{} in a video game."
    assert TEMPLATES["caltech101"][-1] == "a doodle of the {}."
    for name, templates in TEMPLATES.items():
        assert len(set(templates)) == len(templates), name


def test_imagenet_classnames_order_and_duplicates():
    assert len(IMAGENET_CLASSNAMES) == 1000
    spot = {0: "tench", 1: "goldfish", 2: "great white shark", 134: "crane bird",
            207: "Golden Retriever", 281: "tabby cat", 409: "analog clock", 517: "construction crane",
            530: "digital clock", 638: "tights", 639: "one-piece bathing suit", 817: "sports car",
            954: "banana", 999: "toilet paper"}
    for index, name in spot.items():
        assert IMAGENET_CLASSNAMES[index] == name
    where = defaultdict(list)
    for index, name in enumerate(IMAGENET_CLASSNAMES):
        assert name == name.strip() and name
        where[name].append(index)
    duplicates = {name: idx for name, idx in where.items() if len(idx) > 1}
    assert duplicates == {"missile": [657, 744]}
    assert len(where) == 999


def test_load_builtin_sets_returns_copies_and_accepts_spellings():
    templates = load_templates("imagenet")
    assert templates == IMAGENET_TEMPLATES
    templates.append("junk {}")
    assert len(IMAGENET_TEMPLATES) == 80
    assert load_templates("Stanford Cars") == TEMPLATES["stanford_cars"]
    assert load_templates("fgvc-aircraft") == TEMPLATES["fgvc_aircraft"]
    assert load_templates("CIFAR-10") == TEMPLATES["cifar10"]
    names = load_classnames("ImageNet")
    assert names == IMAGENET_CLASSNAMES and names is not IMAGENET_CLASSNAMES


def test_load_templates_from_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\na photo of a {}.\n  a {c} in the wild.  \n# end\n", encoding="utf-8")
    assert load_templates(path) == ["a photo of a {}.", "a {} in the wild."]
    assert load_templates(str(path)) == ["a photo of a {}.", "a {} in the wild."]


@pytest.mark.parametrize(
    "bad, why",
    [
        ("a photo of a dog.", "placeholder"),
        ("a {} next to a {}.", "placeholder"),
        ("a photo of a {label}.", "placeholder"),
        ("a {} with {braces}.", "braces"),
    ],
)
def test_load_templates_bad_line_names_file_and_line(tmp_path, bad, why):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# header\na photo of a {{}}.\n{bad}\n", encoding="utf-8")
    with pytest.raises(SailError, match=why) as info:
        load_templates(path)
    assert f"{path}:3" in str(info.value)


def test_check_template_normalises_c_placeholder():
    assert check_template("art of the {c}.") == "art of the {}."
    with pytest.raises(SailError):
        check_template("art of the thing.")


def test_unknown_name_lists_builtins():
    with pytest.raises(SailError) as info:
        load_templates("imagenet-21k")
    message = str(info.value)
    for name in ("imagenet", "cifar10", "food101", "sun397"):
        assert name in message
    with pytest.raises(SailError, match="imagenet"):
        load_classnames("cifar10")


def test_empty_files_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n   \n", encoding="utf-8")
    with pytest.raises(SailError, match="no templates"):
        load_templates(empty)
    with pytest.raises(SailError, match="no class names"):
        load_classnames(empty)


def test_load_classnames_from_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\n# a comment\n  dog  \nred panda\n", encoding="utf-8")
    assert load_classnames(path) == ["cat", "dog", "red panda"]
