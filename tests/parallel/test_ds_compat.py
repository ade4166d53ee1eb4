"""The DeepSpeed-internal patches: one module, each patch naming its guard test, one warning on
an untested DeepSpeed version."""
from __future__ import annotations

import logging
from pathlib import Path

from memgpt_dist.parallel import ds_compat

ROOT = Path(__file__).resolve().parents[2]


def test_untested_deepspeed_version_warns_once_naming_every_patch(caplog):
    with caplog.at_level(logging.WARNING, logger=ds_compat.__name__):
        assert ds_compat.check_version(ds_compat.TESTED_VERSION)
        assert not caplog.records
        assert not ds_compat.check_version("0.21.0")
    assert len(caplog.records) == 1
    assert all(p.name in caplog.text for p in ds_compat.PATCHES) and "0.21.0" in caplog.text


def test_every_patch_names_a_test_that_exists():
    for patch in ds_compat.PATCHES:
        path, _, name = patch.test.split(" ")[0].partition("::")
        source = (ROOT / path).read_text()
        assert not name or f"def {name}(" in source, patch
