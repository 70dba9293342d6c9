"""Deploy the Space: ``python space/deploy.py ORG/NAME [--private]`` from a checkout (logged in with
``hf auth login`` or ``HF_TOKEN``, write access to ORG).

It stages the Space's files in a temporary folder — the app, its README (the Space's configuration), its
requirements, the package's source, ``benchmarks/quality`` (the MiniLM heads) and the bundled example — and uploads
that folder with one ``HfApi.upload_folder`` call (one commit, so one build). ``--stage DIR`` only writes the folder;
``hf upload ORG/NAME DIR . --repo-type space`` then uploads it, which is the same thing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (source, destination in the Space) — globs relative to the repository root
FILES = [
    ("space/README.md", "README.md"),
    ("space/app.py", "app.py"),
    ("space/lowrank_space.py", "lowrank_space.py"),
    ("space/requirements.txt", "requirements.txt"),
    ("lowrank_methods/**/*.py", None),
    ("lowrank_methods/publish/templates/*", None),  # the model card's template
    ("benchmarks/__init__.py", None),
    ("benchmarks/quality/*.py", None),
    ("examples/minilm-wordnet8/README.md", None),
    ("examples/minilm-wordnet8/adapters/*/adapter_config.json", None),
    ("examples/minilm-wordnet8/adapters/*/adapter_model.safetensors", None),
    ("examples/minilm-wordnet8/data/*", None),
    ("recipes/*.yml", None),
]


def stage(target: Path, root: Path = ROOT) -> list[str]:
    """Copy the Space's files into ``target`` (which must not exist or be empty); returns their paths in the Space."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"error: {target} is not empty; stage into a new folder")
    written = []
    for pattern, destination in FILES:
        matches = sorted(p for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
        if not matches:
            raise SystemExit(f"error: nothing matches {pattern} under {root}; run from a complete checkout")
        for path in matches:
            relative = destination or path.relative_to(root).as_posix()
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)
            written.append(relative)
    return sorted(written)


def deploy(repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Stage and upload the Space to ``repo_id`` (created as a Gradio Space if missing); returns the Space's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mergekit-lowrank-space-") as folder:
        stage(Path(folder) / "space")
        api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=Path(folder) / "space",
                          commit_message="Deploy the mergekit-lowrank Space")
    return f"{api.endpoint}/spaces/{repo_id}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", nargs="?", metavar="ORG/NAME", help="the Space to create or update")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    parser.add_argument("--stage", metavar="DIR", help="only write the Space's files into DIR")
    args = parser.parse_args(argv)
    if args.stage:
        files = stage(Path(args.stage))
        print(f"staged {len(files)} files in {args.stage}; upload with: hf upload ORG/NAME {args.stage} . "
              "--repo-type space")
        return
    if not args.repo_id:
        parser.error("name the Space (ORG/NAME), or pass --stage DIR")
    print(f"deployed: {deploy(args.repo_id, private=args.private)}")


if __name__ == "__main__":
    sys.exit(main())
