"""Static checks of docker/Dockerfile and .dockerignore, and the image's HEALTHCHECK and CMD run here.

No Docker engine is needed: the Dockerfile is parsed with the standard library, and the python commands the image
runs are run with this interpreter, in the repository folder the Dockerfile's WORKDIR is copied from.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with line continuations joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment and empty lines, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE)


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in INSTRUCTIONS if kw == keyword]


def arg_defaults() -> dict[str, str]:
    """Default values of the ``ARG`` instructions."""
    defaults = {}
    for args in args_of("ARG"):
        name, _, value = args.partition("=")
        defaults[name.strip()] = value.strip().strip("\"'")
    return defaults


def expand(text: str) -> str:
    """Substitute ``${NAME}`` and ``$NAME`` with the ARG defaults (as a build without --build-arg does)."""
    defaults = arg_defaults()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def flags_and_rest(args: str) -> tuple[dict[str, str], str]:
    """Split leading ``--flag=value`` options (COPY, HEALTHCHECK) from the rest of the arguments."""
    flags = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        args = args.strip()
    return flags, args


def command_argv(args: str) -> list[str]:
    """argv of a CMD, RUN or HEALTHCHECK CMD in exec form (JSON array) or shell form."""
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


def copies() -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of each COPY/ADD from the build context."""
    result = []
    for kw, args in INSTRUCTIONS:
        if kw not in ("COPY", "ADD"):
            continue
        flags, rest = flags_and_rest(args)
        if "from" in flags:
            continue
        parts = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        result.append(([expand(p) for p in parts[:-1]], expand(parts[-1])))
    return result


def copied_to(source: str) -> PurePosixPath:
    """Where the image holds the build-context file or folder ``source``."""
    for sources, dest in copies():
        for copied in sources:
            if copied.rstrip("/") != source.rstrip("/"):
                continue
            if (REPO / copied).is_dir():  # COPY puts a folder's contents into the destination
                return PurePosixPath(dest)
            if len(sources) > 1 or dest.endswith("/"):
                return PurePosixPath(dest) / PurePosixPath(copied).name
            return PurePosixPath(dest)
    raise AssertionError(f"the Dockerfile does not COPY {source}")


def repo_path_of(image_path: str) -> Path:
    """The repository folder or file that ``image_path`` in the image was copied from (via the COPY instructions)."""
    target = PurePosixPath(image_path)
    for sources, _ in copies():
        for source in sources:
            dest = copied_to(source)
            if target == dest or dest in target.parents:
                return REPO / source / target.relative_to(dest)
    raise AssertionError(f"{image_path} is not copied from the repository")


def workdir() -> str:
    return expand(args_of("WORKDIR")[-1])


def local_argv(argv: list[str]) -> list[str]:
    """``argv`` with the image's ``python`` replaced by this interpreter."""
    assert argv[0] in ("python", "python3"), f"expected a python command, got {argv}"
    return [sys.executable, *argv[1:]]


def healthcheck_argv() -> list[str]:
    checks = args_of("HEALTHCHECK")
    assert len(checks) == 1, "expected exactly one HEALTHCHECK"
    _, rest = flags_and_rest(checks[0])
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK must run a command, got {rest!r}"
    return command_argv(command.strip())


def cmd_argv() -> list[str]:
    cmds = args_of("CMD")
    assert cmds, "the Dockerfile has no CMD"
    return command_argv(cmds[-1])


def torch_lower_bound(requirements: list[str]) -> tuple[int, ...]:
    """Highest ``torch>=X.Y`` lower bound in ``requirements`` (``(0,)`` when there is none)."""
    bounds = [(0,)]
    for req in requirements:
        name = re.match(r"\s*torch(?![\w.-])([^;]*)", req)  # torch itself, not torchvision; before any marker
        bound = name and re.search(r">=\s*([0-9.]+)", name.group(1))
        if bound:
            bounds.append(tuple(int(x) for x in bound.group(1).rstrip(".").split(".")))
    return max(bounds)


def test_base_image_is_a_cuda_pytorch_image_pinned_by_tag():
    froms = args_of("FROM")
    assert froms, "the Dockerfile has no FROM"
    image = expand(froms[-1].split()[0])
    match = re.fullmatch(
        r"(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-(runtime|devel)(@sha256:[0-9a-f]{64})?",
        image,
    )
    assert match, f"base image {image!r} is not a pytorch/pytorch CUDA image pinned by a version tag"
    assert "latest" not in image
    torch_version = tuple(int(x) for x in match.group(1).split("."))

    # the base image's torch must satisfy what the install asks for, or pip would replace it
    pyproject_bound = torch_lower_bound(re.findall(r'"(torch[^"]*)"', PYPROJECT.read_text(encoding="utf-8")))
    assert torch_version >= pyproject_bound, f"torch {match.group(1)} is older than pyproject.toml's {pyproject_bound}"
    from importlib.metadata import requires

    monai_bound = torch_lower_bound([r for r in requires("monai") or [] if "extra ==" not in r])
    assert torch_version >= monai_bound, f"torch {match.group(1)} is older than MONAI's requirement {monai_bound}"


def test_every_copied_path_exists_and_is_not_dockerignored():
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert copies(), "the Dockerfile copies nothing"
    for sources, _ in copies():
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} does not exist in the repository"
            name = source.rstrip("/")
            hits = [p for p in ignored if fnmatch.fnmatch(name, p.removeprefix("**/")) and not p.startswith("!")]
            assert not hits, f"COPY source {source} is excluded by .dockerignore {hits}"
    for needed in ("pyproject.toml", "medkd", "bundles"):
        copied_to(needed)


def test_dockerignore_excludes_outputs_and_caches():
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    for sample in (
        ".git",
        "medkd/__pycache__",
        "bundles/segmentation_2d/data",
        "bundles/segmentation_2d/models",
        "bundles/segmentation_2d/eval",
        "bundles/segmentation_2d/runs",
    ):
        assert any(
            fnmatch.fnmatch(sample, p) or (p.startswith("**/") and fnmatch.fnmatch(PurePosixPath(sample).name, p[3:]))
            for p in patterns
            if p and not p.startswith(("#", "!"))
        ), f".dockerignore does not exclude {sample}"


def test_install_step_installs_the_copied_package_and_keeps_cuda_torch():
    source_dir = str(copied_to("pyproject.toml").parent)
    assert copied_to("medkd") == PurePosixPath(source_dir) / "medkd"
    installs = [expand(run) for run in args_of("RUN") if "pip install" in run]
    assert len(installs) == 1, f"expected one pip install step, got {installs}"
    install = installs[0]
    match = re.search(r"pip install ([^&;|]*)", install)
    words = shlex.split(match.group(1))
    targets = [w for w in words if not w.startswith("-")]
    from_source = [t for t in targets if t == source_dir or t.startswith(source_dir + "[")]
    assert from_source, f"pip does not install {source_dir} (the copied source): {install}"
    extras = re.findall(r"\[([^\]]*)\]", from_source[0])
    pyproject = PYPROJECT.read_text(encoding="utf-8")
    declared = re.search(r"\[project\.optional-dependencies\](.*?)(?:\n\[|\Z)", pyproject, re.S).group(1)
    for extra in extras[0].split(",") if extras else []:
        assert re.search(rf"^{extra.strip()}\s*=", declared, re.M), f"extra {extra} is not declared in pyproject.toml"
    assert "--no-cache-dir" in words
    assert not any(re.match(r"torch\b", t) for t in targets), "the install step must not install torch itself"
    # pip may replace the base image's CUDA torch unless torch is constrained to the installed version
    assert re.search(r"(--constraint|-c)\s+\S+", match.group(1)), "pip install runs without a torch constraint"
    assert "torch==" in install and "torch.__version__" in install
    assert "torch.version.cuda" in install, "the build does not check that torch is still the CUDA build"


def test_user_is_non_root_with_a_writable_workspace():
    users = args_of("USER")
    assert users, "the Dockerfile has no USER: the container would run as root"
    user, _, group = expand(users[-1]).partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), f"USER {users[-1]} is root"
    runs = " ".join(expand(run) for run in args_of("RUN"))
    created = rf'useradd\b[^&;]*--uid\s+"?{user}\b' if user.isdigit() else rf"useradd\b[^&;]*\s{user}\b"
    assert re.search(created, runs), f"user {user} is not created with useradd"
    assert re.search(r"mkdir -p /workspace\b", runs) and re.search(r"chown \S+ /workspace\b", runs)
    # the USER comes after the steps that need root
    keywords = [kw for kw, _ in INSTRUCTIONS]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:], "a RUN step after USER would not run as root"


def test_workdir_is_the_copied_bundles_folder():
    assert workdir() == str(copied_to("bundles"))
    assert repo_path_of(workdir()) == REPO / "bundles"


def test_healthcheck_command_succeeds_here():
    argv = local_argv(healthcheck_argv())
    result = subprocess.run(
        argv,
        cwd=repo_path_of(workdir()),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr


def test_cmd_lists_the_bundles():
    argv = cmd_argv()
    if argv[0] not in ("python", "python3"):
        pytest.skip(f"CMD is not a python command: {argv}")
    bundles_dir = repo_path_of(workdir())
    result = subprocess.run(
        local_argv(argv),
        cwd=bundles_dir,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    metadata = sorted(bundles_dir.glob("*/configs/metadata.json"))
    assert metadata, "no bundles found"
    for meta in metadata:
        bundle = meta.parents[1].name
        name = json.loads(meta.read_text(encoding="utf-8"))["name"]
        assert re.search(rf"\b{re.escape(bundle)}\b.*{re.escape(name)}", result.stdout), (
            f"CMD output does not list {bundle} ({name}):\n{result.stdout}"
        )


# ------------------------------------------------------------------ the image's torch and the README's commands

README = REPO / "docker" / "README.md"
BUNDLES = REPO / "bundles"


def base_image_torch() -> str:
    return re.search(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", expand(args_of("FROM")[-1])).group(1)


def test_the_image_has_the_torch_of_the_bundles_metadata():
    """One torch version: the base image's, every bundle's metadata.json's and the one the READMEs install."""
    versions = {
        json.loads(m.read_text(encoding="utf-8"))["pytorch_version"] for m in BUNDLES.glob("*/configs/metadata.json")
    }
    assert versions == {base_image_torch()}, f"metadata.json says {versions}, the image has {base_image_torch()}"
    for doc in (README, REPO / "README.md"):
        installed = set(re.findall(r"torch==([0-9.]+)", doc.read_text(encoding="utf-8")))
        assert installed <= versions, f"{doc.name} installs torch {installed}, metadata.json says {versions}"


def test_the_image_has_a_c_compiler_for_compile():
    """torch.compile (inductor, Triton) builds C/C++ code at run time: the runtime image lacks gcc unless installed."""
    image = expand(args_of("FROM")[-1])
    installs = " ".join(expand(run) for run in args_of("RUN"))
    assert image.endswith("-devel") or re.search(r"apt-get install[^&;]*\bgcc\b[^&;]*\bg\+\+", installs), installs
    assert "--compile True" in README.read_text(encoding="utf-8")


def docker_commands() -> list[list[str]]:
    """The command each ``docker run ... medkd`` of the docker README runs in the image (continued lines joined)."""
    text = README.read_text(encoding="utf-8").replace("\\\n", " ")
    return [shlex.split(found, comments=True) for found in re.findall(r"^docker run .*? medkd (.+)$", text, re.M)]


def test_the_docker_commands_are_the_bundle_readmes_commands():
    """Each stage command of the image is the bundle README's (medkd.bundles.run_command) typed one folder up, in the
    image's WORKDIR (config files under ``<bundle>/``), plus options that put every output under /workspace."""
    from medkd.bundles import STAGES as BUNDLE_STAGES
    from medkd.bundles import run_command, stage_files

    assert repo_path_of(workdir()) == BUNDLES
    runs = [argv for argv in docker_commands() if "monai.bundle" in argv]
    assert len(runs) >= 8, runs
    for argv in runs:
        listed = argv[argv.index("--config_file") + 1]
        files = [BUNDLES / f for f in (ast.literal_eval(listed) if listed.startswith("[") else [listed])]
        meta = argv[argv.index("--meta_file") + 1] if "--meta_file" in argv else files[0].parents[1].name + "/x"
        bundle = BUNDLES / meta.split("/")[0]
        assert argv[argv.index("--bundle_root") + 1] == f"/workspace/{bundle.name}", argv
        stages = [s for s in BUNDLE_STAGES if stage_files(bundle, s) == files]
        if not stages:  # the teacher on several GPUs: the teacher stage's files, then the multi-GPU overlay
            assert files == stage_files(bundle, "train_teacher") + stage_files(bundle, "multi_gpu_train")[-1:], argv
            continue
        expected = shlex.split(run_command(bundle, stages[0], start=BUNDLES))
        assert argv[: len(expected)] == expected, f"{argv} is not the {bundle.name} README's {expected}"
        readme = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
        assert run_command(bundle, stages[0]) in readme, f"{bundle.name}'s README lacks {stages[0]}"


def test_every_docker_command_writes_under_workspace():
    """The image's bundles folder is read-only for its user: runs and comparisons write to the /workspace volume."""
    commands = docker_commands()
    compares = [argv for argv in commands if argv[:4] == ["python", "-m", "medkd", "compare"]]
    assert compares, "the docker README shows no comparison"
    for argv in compares:
        assert argv[argv.index("--output") + 1].startswith("/workspace/"), argv
        assert f"bundle_root=/workspace/{argv[4]}" in argv, argv  # the embedded data is copied into <bundle_root>/data
        assert (repo_path_of(workdir()) / argv[4] / "configs" / "metadata.json").is_file(), argv
