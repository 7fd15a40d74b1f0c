"""Publish every course notebook as a Kaggle kernel (Kaggle CLI: pip install kaggle, and an API token).

    python kaggle/push.py YOUR_USERNAME                       # push all notebooks
    python kaggle/push.py YOUR_USERNAME --only 04 08          # some of them
    python kaggle/push.py YOUR_USERNAME --course-repo https://github.com/you/course \\
        --course-dataset YOUR_USERNAME/medical-tl-course      # see kaggle/README.md
    python kaggle/push.py YOUR_USERNAME --out build/kaggle    # write the folders, push nothing

Each `kaggle/<notebook>/kernel-metadata.json` names the kernel `YOUR_KAGGLE_USERNAME/<slug>`; this
script writes a copy of each folder with your username (and the notebook itself, with COURSE_REPO
set and the course dataset attached when given) and runs `kaggle kernels push -p <folder>`.
Standard library only, so it runs without the course's environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLACEHOLDER = "YOUR_KAGGLE_USERNAME"


def kernel_folders(only: list[str] | None = None) -> list[Path]:
    """The kaggle/<NN_name>/ folders, optionally those whose number or name is in `only`."""
    folders = sorted(p for p in HERE.iterdir() if (p / "kernel-metadata.json").is_file())
    if only:
        folders = [p for p in folders if p.name in only or p.name.split("_")[0] in {o.zfill(2) for o in only}]
    return folders


def prepare(folder: Path, target: Path, username: str, course_repo: str | None = None,
            course_dataset: str | None = None) -> Path:
    """Write `folder`'s metadata (username filled in) and its notebook into `target`."""
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    notebook = (folder / meta["code_file"]).resolve()
    nb = json.loads(notebook.read_text())
    if course_repo:
        setup = next(c for c in nb["cells"] if c["cell_type"] == "code")
        lines = [line for line in setup["source"] if line.startswith("COURSE_REPO = ")]
        if not lines:
            sys.exit(f"{notebook.name}: no COURSE_REPO line in the setup cell; set it by hand")
        setup["source"][setup["source"].index(lines[0])] = f'COURSE_REPO = "{course_repo}"\n'
    meta["id"] = meta["id"].replace(PLACEHOLDER, username)
    meta["code_file"] = notebook.name
    if course_dataset:
        meta["dataset_sources"] = [*meta["dataset_sources"], course_dataset]
    target.mkdir(parents=True, exist_ok=True)
    (target / notebook.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    (target / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("username", help="your Kaggle user name (replaces YOUR_KAGGLE_USERNAME)")
    parser.add_argument("--only", nargs="*", help="notebook numbers or names")
    parser.add_argument("--course-repo", help="git URL the setup cell pip-installs the course from")
    parser.add_argument("--course-dataset", help="Kaggle dataset <owner>/<slug> holding a copy of the course")
    parser.add_argument("--out", type=Path, help="write the kernel folders here and push nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for folder in kernel_folders(args.only):
            target = prepare(folder, root / folder.name, args.username, args.course_repo, args.course_dataset)
            if args.out is None:
                subprocess.run(["kaggle", "kernels", "push", "-p", str(target)], check=True)
            else:
                print("prepared", target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
