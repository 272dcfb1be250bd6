"""DVC's stages depend on the config that svc.yaml names, not only on svc.yaml (real DVC)."""
from __future__ import annotations

import yaml

from assets.workspace import DVC_YAML, PROJECT_ROOT, Workspace, init_workspace, with_config_deps
from svc_model.config import CONFIG_DIR


def _deps(root) -> dict[str, list[str]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: stage["deps"] for name, stage in stages.items()}


def test_dvc_stages_depend_on_the_profile_and_what_it_extends(workspace):
    # Fails if dvc.yaml lists svc.yaml only: editing the profile it names (a pitch backend, a Whisper size) would
    # leave `dvc repro` with nothing to do. Also fails if re-running `svc init` after switching profiles keeps the
    # old profile's lines.
    root = workspace.root
    for deps in _deps(root).values():
        assert "svc.yaml" in deps and str(CONFIG_DIR / "tiny.yaml") in deps  # outside the workspace: absolute

    (root / "mine.yaml").write_text("extends: tiny\n")
    (root / "svc.yaml").write_text((root / "svc.yaml").read_text().replace("config: tiny", "config: mine.yaml"))
    init_workspace(root)
    for deps in _deps(root).values():
        config_deps = [d for d in deps if d.endswith(".yaml") and d != "svc.yaml"]
        assert config_deps == ["mine.yaml", str(CONFIG_DIR / "tiny.yaml")], deps

    # Real DVC: record the stages as done, then edit the profile.
    for asset in ("clean_audio", "pitch", "ppg", "vec", "speaker_embedding", "training_set"):
        (root / "data" / "derived" / asset).mkdir(parents=True, exist_ok=True)
        (root / "data" / "derived" / asset / "placeholder").write_text(asset)
    (root / "data" / "raw" / "placeholder").write_text("raw")
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "evaluation.json").write_text("{}")
    ws = Workspace(root)
    ws.run_tool("dvc", "commit", "-f", "-q")
    assert "up to date" in ws.run_tool("dvc", "status").stdout
    (root / "mine.yaml").write_text("extends: tiny\nfeatures:\n  pitch:\n    backend: crepe\n")
    status = ws.run_tool("dvc", "status").stdout
    assert "features:" in status and "train:" in status and "modified:           mine.yaml" in status, status


def test_the_projects_dvc_yaml_is_the_template_for_its_own_svc_yaml():
    # Fails if the repo's dvc.yaml drifts from what `svc init` writes (e.g. loses the profile dependency).
    assert (PROJECT_ROOT / "dvc.yaml").read_text() == with_config_deps(Workspace(PROJECT_ROOT), DVC_YAML)
    assert "configs/tiny.yaml" in _deps(PROJECT_ROOT)["features"]
