"""Generated bundle configs: one hand-edited source per config, the other bundles' files merged from it.

A bundle whose ``source/generate.json`` exists has generated stage files. It may name its ``base`` bundle folder, and
names, per stage, the overrides to apply to what the stage is made of, e.g. ::

    {"base": "../segmentation_2d", "stages": {"train": {"spatial_dims": 3}, "evaluate": {}}}

The overrides merge as MONAI's ``ConfigParser`` merges config files (``+`` keys extend, ``#`` paths reach into
nested items). ``train.json`` is the base's ``train.json`` with the train overrides (a bundle without a ``base``
keeps its hand-edited ``train.json``). A stage of :data:`STANDALONE_STAGES` is complete, so that it runs alone as
well as after ``train.json``: the bundle's ``train.json``, then the stage's additions to it, then the stage's
overrides. The additions are the bundle's hand-edited ``source/<stage>.json`` where it has one (the 2D bundles), else
those of its base (its base's ``source/<stage>.json`` and the base's overrides), never the base's complete file, whose
``train.json`` keys would return; it records the :func:`~medkd.bundles.train_digest` of that ``train.json``
(``generated_from_train``), so that running it beside a ``train.json`` edited since stops with the command that
regenerates it. Another stage file (``train_teacher.json``, ``multi_gpu_train.json``) stays an
addition to ``train.json``: the base's stage file with the overrides. Base keys that a bundle does not use are left
out of the stage file it writes by that stage's ``remove`` list, ``#`` paths reaching into nested items (``"remove":
{"train": ["pixdim", "fingerprint#label_values"]}``), so a generated file holds no unused keys. A generated
``train.json``'s ``plan_used`` is written from its ``default_plan`` (:func:`plan_used`), so the planned keys are listed
once per bundle. Every value is written with the layout of the file it came from (4-space indent; a value on one line
stays on one line), so a generated file reads like its source.

``python -m medkd bundles --generate`` rewrites the generated files, ``--check`` (the tests) says which ones differ.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY, MERGE_KEY, merge_kv

from medkd.bundles import DEFAULT_PLAN, DERIVED_PLAN_KEYS, GENERATED_FROM, PLAN_USED, train_digest
from medkd.errors import ConfigError

__all__ = [
    "SOURCE",
    "STANDALONE_STAGES",
    "generated_configs",
    "stale_configs",
    "write_configs",
    "format_config",
    "plan_used",
    "add_bundles_parser",
]

SOURCE = "source/generate.json"  # in a generated bundle's folder
STANDALONE_STAGES = ("evaluate", "inference")
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

Layout = dict[tuple[str, ...], bool]  # path of a value (keys, list indices as text) -> written on one line


def _path(key: str) -> tuple[str, ...]:
    """The path of a config key (``#`` or ``::`` between the names of nested items)."""
    return tuple(ReferenceResolver.normalize_id(key).split(ID_SEP_KEY))


def _skip(text: str, i: int) -> int:
    while text[i] in " \t\r\n,:":
        i += 1
    return i


def _layout(text: str) -> Layout:
    """Which values of the JSON ``text`` are written on one line, by path."""
    decoder, layout = json.JSONDecoder(), {}

    def walk(i: int, path: tuple[str, ...]) -> int:
        value, end = decoder.raw_decode(text, i)
        layout[path] = "\n" not in text[i:end]
        if layout[path] or not isinstance(value, (dict, list)):
            return end
        i = _skip(text, i + 1)
        for key in value if isinstance(value, dict) else map(str, range(len(value))):
            if isinstance(value, dict):
                i = _skip(text, decoder.raw_decode(text, i)[1])
            i = _skip(text, walk(i, (*path, key)))
        return end

    walk(_skip(text, 0), ())
    return layout


def _dump(value: Any, layout: Layout, path: tuple[str, ...], indent: int) -> str:
    if not isinstance(value, (dict, list)) or not value or layout.get(path, False):
        return json.dumps(value, ensure_ascii=False)
    pad = " " * (indent + 4)
    pairs = value.items() if isinstance(value, dict) else ((str(i), v) for i, v in enumerate(value))
    items = [
        pad
        + (f"{json.dumps(k, ensure_ascii=False)}: " if isinstance(value, dict) else "")
        + _dump(v, layout, (*path, k), indent + 4)
        for k, v in pairs
    ]
    brackets = "{}" if isinstance(value, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(items) + "\n" + " " * indent + brackets[1]


def format_config(config: Mapping[str, Any], layout: Layout) -> str:
    """The text of a config file: ``config`` with the one-line values of ``layout``, the others one item a line."""
    return _dump(dict(config), {**layout, (): False}, (), 0) + "\n"


def _read(path: Path, *keys: str, texts: Mapping[Path, str] | None = None) -> tuple[dict, Layout]:
    """The JSON file at ``path`` (its item at ``keys``; its text from ``texts`` when there) and the layout of its
    values, by path from that item."""
    if path not in (texts or {}) and not path.is_file():
        raise ConfigError(f"{path} does not exist: a generated bundle's base must hold the stage files it names.")
    text = (texts or {}).get(path) or path.read_text(encoding="utf-8")
    config = json.loads(text)
    for key in keys:
        config = config.get(key, {})
    layout = {p[len(keys) :]: inline for p, inline in _layout(text).items() if p[: len(keys)] == keys}
    return config, layout


def _merge(sources: list[tuple[dict, Layout]]) -> tuple[dict, Layout]:
    """``sources`` merged in order as ``ConfigParser.load_config_files`` merges files, with the layout of each value
    from the source it came from (a ``+`` key keeps the layout of what it extends)."""
    parser, layout = ConfigParser(config={}), {}
    for config, source_layout in sources:
        for key, value in config.items():
            name = key.removeprefix(MERGE_KEY)
            path = _path(name)
            target = parser[name] if key.startswith(MERGE_KEY) and name in parser else None  # what a + key extends
            offset = len(target) if isinstance(target, list) else 0
            if target is None:
                layout = {p: v for p, v in layout.items() if p[: len(path)] != path}
            for p, inline in source_layout.items():
                if p[:1] == (key,) and not (target is not None and len(p) == 1):
                    rest = p[1:]
                    if rest and offset:
                        rest = (str(int(rest[0]) + offset), *rest[1:])
                    layout[(*path, *rest)] = inline
            merge_kv(parser, key, copy.deepcopy(value))  # a source serves several stages: never extend it
    return parser.get(), layout


def _add(sources: list[tuple[dict, Layout]]) -> tuple[dict, Layout]:
    """``sources`` as one file that adds to ``train.json``: the keys of each, as written, replace the same keys of
    those before (``+`` keys and ``#`` paths stay as they are, for MONAI to merge after ``train.json``)."""
    config: dict = {}
    layout: Layout = {}
    for source, source_layout in sources:
        config.update(source)
        layout = {p: v for p, v in layout.items() if p[:1] not in {(k,) for k in source}}
        layout.update({p: v for p, v in source_layout.items() if p})
    return config, layout


def _spec(bundle: Path) -> tuple[dict, Path | None]:
    """The settings of ``bundle``'s :data:`SOURCE` and its base bundle folder (``None`` without a base)."""
    settings, _ = _read(bundle / SOURCE)
    return settings, (bundle / settings["base"]).resolve() if settings.get("base") else None


def _additions(bundle: Path, stage: str) -> list[tuple[dict, Layout]]:
    """What a :data:`STANDALONE_STAGES` stage of ``bundle`` adds to its ``train.json``, in merge order: its hand-edited
    ``source/<stage>.json``, else its base's additions, then the stage's overrides."""
    settings, base = _spec(bundle)
    own = bundle / "source" / f"{stage}.json"
    if own.is_file():
        first = [_read(own)]
    elif base is not None and (base / SOURCE).is_file():
        first = _additions(base, stage)
    else:
        raise ConfigError(f"{bundle / SOURCE}: the {stage} stage needs {own} or a base bundle with its own "
                          f"{SOURCE}; write one of them.")  # fmt: skip
    return first + [_read(bundle / SOURCE, "stages", stage)]


def _remove(generated: tuple[dict, Layout], paths: list[str], spec: Path) -> tuple[dict, Layout]:
    """``generated`` without the items at ``paths`` (``#`` paths reach into nested items) and their layout."""
    config, layout = generated
    for path in paths:
        *parents, key = names = _path(path)
        parent = config
        for name in parents:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or key not in parent:
            raise ConfigError(f'{spec}: "remove" names {path}, which the generated file does not hold; take it off '
                              "the list.")  # fmt: skip
        del parent[key]
        layout = {p: inline for p, inline in layout.items() if p[: len(names)] != names}
    return config, layout


def plan_used(config: Mapping[str, Any]) -> str:
    """The ``plan_used`` expression of a bundle's train ``config``: the value of each key of its ``default_plan``, then
    of each of :data:`~medkd.bundles.DERIVED_PLAN_KEYS` it holds, by key."""
    keys = [*config[DEFAULT_PLAN], *(key for key in DERIVED_PLAN_KEYS if key in config)]
    return "${" + ", ".join(f"'{key}': @{key}" for key in keys) + "}"


def _with_plan_used(generated: tuple[dict, Layout]) -> tuple[dict, Layout]:
    """``generated`` (a train config) with the ``plan_used`` of its ``default_plan``."""
    config, layout = generated
    if PLAN_USED in config:
        config[PLAN_USED] = plan_used(config)
    return config, layout


def _plan(bundle: Path, texts: Mapping[Path, str]) -> Iterator[tuple[str, tuple[dict, Layout]]]:
    """Each generated stage of ``bundle`` and its config (the generated files of ``texts`` read as given)."""
    spec = bundle / SOURCE
    settings, base = _spec(bundle)
    stages = settings.get("stages", {})
    if base is None and set(stages) - set(STANDALONE_STAGES):
        raise ConfigError(f"{spec}: the stages {sorted(set(stages) - set(STANDALONE_STAGES))} are made from a base "
                          'bundle\'s files; name it ("base": "../segmentation_2d").')  # fmt: skip
    if set(settings.get("remove", {})) - set(stages):
        raise ConfigError(f'{spec}: "remove" names the stages {sorted(set(settings["remove"]) - set(stages))}, which '
                          '"stages" lacks; remove keys of the stages it names.')  # fmt: skip
    for stage in sorted(stages, key=lambda s: s != "train"):  # train.json first: the complete stages hold it
        if stage == "train":
            generated = _merge([_read(base / "configs" / "train.json", texts=texts), _read(spec, "stages", stage)])
        elif stage in STANDALONE_STAGES:
            train = _read(bundle / "configs" / "train.json", texts=texts)
            generated = _merge([train, *_additions(bundle, stage)])
            generated[0][GENERATED_FROM] = train_digest(train[0])
        else:
            generated = _add([_read(base / "configs" / f"{stage}.json", texts=texts), _read(spec, "stages", stage)])
        generated = _remove(generated, settings.get("remove", {}).get(stage, []), spec)
        yield stage, _with_plan_used(generated) if stage == "train" else generated


def _generated_bundles(bundles: Path) -> list[Path]:
    """The bundles under ``bundles`` with a :data:`SOURCE`, each after the bundle it is generated from."""
    found = sorted(path.parent.parent for path in bundles.glob(f"*/{SOURCE}"))
    bases = {b: _spec(b)[1] for b in found}
    ordered: list[Path] = []
    while len(ordered) < len(found):
        ready = [b for b in found if b not in ordered and (bases[b] not in found or bases[b] in ordered)]
        if not ready:
            raise ConfigError(f"{', '.join(str(b / SOURCE) for b in found if b not in ordered)}: the bases form a "
                              "cycle; generate each bundle from a hand-edited one.")  # fmt: skip
        ordered.append(ready[0])
    return ordered


def generated_configs(bundles: str | Path = BUNDLES) -> dict[Path, str]:
    """The text of every generated config file under ``bundles``, by path (a bundle generated from another generated
    bundle reads the text this generation gives it, not the file on disk)."""
    texts: dict[Path, str] = {}
    for bundle in _generated_bundles(Path(bundles).resolve()):
        for stage, (config, layout) in _plan(bundle, texts):
            texts[bundle / "configs" / f"{stage}.json"] = format_config(config, layout)
    return texts


def stale_configs(bundles: str | Path = BUNDLES) -> list[Path]:
    """The generated config files under ``bundles`` whose text is not what :func:`generated_configs` gives."""
    return [p for p, text in generated_configs(bundles).items()
            if not p.is_file() or p.read_text(encoding="utf-8") != text]  # fmt: skip


def write_configs(bundles: str | Path = BUNDLES) -> list[Path]:
    """Write the generated config files under ``bundles`` that changed; return them."""
    changed = []
    for path, text in generated_configs(bundles).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def _run(args: argparse.Namespace) -> int:
    if not list(Path(args.bundles).glob(f"*/{SOURCE}")):
        raise ConfigError(f"--bundles {args.bundles}: no bundle folder there has a {SOURCE}; give the bundles folder "
                          "of your medkd checkout.")  # fmt: skip
    if args.generate:
        for path in write_configs(args.bundles):
            print(f"wrote {path} (its earlier text is replaced)")
        return 0
    stale = stale_configs(args.bundles)
    if stale:
        raise ConfigError(
            f"{', '.join(map(str, stale))}: not what the sources give (a source changed, or edited by hand: edit the "
            f"bundles' source/ files or the train.json they start from instead), then run: python -m medkd bundles "
            "--generate"
        )
    print(f"The generated configs under {args.bundles} are up to date.")
    return 0


def add_bundles_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``python -m medkd bundles``: write (``--generate``) or check the generated bundle configs."""
    parser = subparsers.add_parser(
        "bundles",
        help="write (--generate) or check the bundle configs generated from the 2D bundles (source/generate.json)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--generate", action="store_true", help="rewrite the generated configs that differ")
    parser.add_argument("--bundles", type=Path, default=BUNDLES, help="the bundles folder (default: %(default)s)")
    parser.set_defaults(handler=_run)
