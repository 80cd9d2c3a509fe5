"""The content-addressed adapter store on its own (no database)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from control_plane.jobs.store import (
    STALE_WORK_AREA_S,
    AdapterStore,
    StagedAdapter,
    adapter_digest,
    copy_capped,
    listing,
)
from control_plane.jobs.validation import AdapterRejected
from tests.support.adapters import write_adapter

KEPT = ("adapter_config.json", "adapter_model.safetensors")


def expected_digest(directory: Path) -> str:
    """The documented definition, computed independently: sha256 of the sha256sum manifest."""
    lines = "".join(
        f"{hashlib.sha256((directory / name).read_bytes()).hexdigest()}  {name}\n" for name in sorted(KEPT)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def stage_copy(store: AdapterStore, area: Path, source: Path) -> StagedAdapter:
    stage = store.new_stage(area)
    for name in KEPT:
        shutil.copyfile(source / name, stage / name)
    return store.seal(stage)


def test_digest_is_the_sha256sum_manifest(tmp_path: Path) -> None:
    source = write_adapter(tmp_path / "adapter")
    (source / "README.md").write_text("not part of the digest")
    digest = adapter_digest(source)
    assert digest == expected_digest(source)
    if shutil.which("sha256sum"):
        shell = subprocess.run(
            "sha256sum adapter_config.json adapter_model.safetensors | sha256sum",
            shell=True,
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
        )
        assert shell.stdout.split()[0] == digest
    other = write_adapter(tmp_path / "other", seed=1)
    assert adapter_digest(other) != digest


def test_commit_is_read_only_and_content_addressed(tmp_path: Path) -> None:
    source = write_adapter(tmp_path / "adapter")
    store = AdapterStore(tmp_path / "store")
    with store.work_area() as area:
        staged = stage_copy(store, area, source)
        final = store.commit(staged)
    assert final == tmp_path / "store" / expected_digest(source)
    assert listing(store.root) == {
        ".tmp": 0o700,
        final.name: 0o555,
        f"{final.name}/adapter_config.json": 0o444,
        f"{final.name}/adapter_model.safetensors": 0o444,
    }
    for name in KEPT:
        assert (final / name).read_bytes() == (source / name).read_bytes()

    # Identical content again: stored once, the staged copy discarded with its work area.
    with store.work_area() as area:
        assert store.commit(stage_copy(store, area, source)) == final
    assert sorted(p.name for p in store.root.iterdir()) == [".tmp", final.name]
    assert list(store.work_root.iterdir()) == []


def test_concurrent_identical_commits(tmp_path: Path) -> None:
    """The rename race: both succeed, one directory exists, no staged copy is left."""
    source = write_adapter(tmp_path / "adapter")
    store = AdapterStore(tmp_path / "store")
    barrier = threading.Barrier(4)
    results: list[Path] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            with store.work_area() as area:
                staged = stage_copy(store, area, source)
                barrier.wait()
                results.append(store.commit(staged))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [".tmp", results[0].name]
    assert list(store.work_root.iterdir()) == []
    assert sorted(p.name for p in results[0].iterdir()) == list(KEPT)


def test_failures_leave_nothing(tmp_path: Path) -> None:
    source = write_adapter(tmp_path / "adapter")
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(RuntimeError), store.work_area() as area:
        stage = store.new_stage(area)
        shutil.copyfile(source / "adapter_config.json", stage / "adapter_config.json")
        (stage / "adapter_config.json").chmod(0o444)
        stage.chmod(0o555)  # even read-only leftovers are removed
        store.seal(stage)  # only one of the two files: refused
    with pytest.raises(AdapterRejected) as caught, store.work_area() as area:
        copy_capped(io.BytesIO(b"x" * 5000), area / "big", limit=4096, what="weights")
    assert caught.value.code == "adapter_too_large"
    assert listing(store.root) == {".tmp": 0o700}


def test_path_for_accepts_digests_only(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for bad in ("..", "../x", "a" * 63, "A" * 64, "g" * 64, ""):
        with pytest.raises(ValueError):
            store.path_for(bad)
    assert store.path_for("a" * 64) == tmp_path.absolute() / ("a" * 64)


def test_stale_work_areas_are_swept_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    stale, recent = root / ".tmp" / "stale", root / ".tmp" / "recent"
    for area in (stale, recent):
        (area / "stage-x").mkdir(parents=True)
        (area / "stage-x" / "adapter_config.json").write_text("{}")
        (area / "stage-x" / "adapter_config.json").chmod(0o444)
    old = time.time() - STALE_WORK_AREA_S - 60
    os.utime(stale, (old, old))
    store = AdapterStore(root)
    with store.work_area():
        pass
    assert sorted(p.name for p in store.work_root.iterdir()) == ["recent"]
