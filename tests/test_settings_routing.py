"""Settings validation and declarative routing, including real vendor files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.errors import ConfigError, RunError
from dicom_node.routing import RunFeatures, effective_rules, route
from dicom_node.runs import decode_pixels, load_run
from dicom_node.settings import Settings, load_settings
from tests.conftest import REAL_DATA
from tests.dicomgen import ct_series, save, xa_run


def test_defaults_and_env_overrides() -> None:
    s = load_settings(
        None,
        environ={
            "DICOM_NODE_PORT": "11999",
            "DICOM_NODE_AE_TITLE": "NODE2",
            "DICOM_NODE_COMPLETION__QUIET_PERIOD_S": "2.5",
            "DICOM_NODE_ALLOWED_CALLING_AETS": '["A", "B"]',
        },
    )
    assert (s.port, s.ae_title, s.completion.quiet_period_s) == (11999, "NODE2", 2.5)
    assert s.allowed_calling_aets == ["A", "B"]
    assert effective_rules(s)  # default rules ship


@pytest.mark.parametrize(
    ("toml", "key", "allowed"),
    [
        ("port = 70000", "port", "less than or equal to 65535"),
        ('ae_title = "WAY_TOO_LONG_AE_TITLE"', "ae_title", "1-16 printable"),
        ('ae_title = "NODE\\n"', "ae_title", "1-16 printable"),  # `$` took a final line feed
        ('colour = "red"', "colour", "unknown key"),
        (
            '[[destinations]]\nkind = "dimse"\nname = "p"\nhost = "h"\nport = 1\nae_title = "A\\\\B"',
            "destinations.0.dimse.ae_title",
            "no backslash",
        ),
        (
            '[[destinations]]\nkind = "dicomweb"\nname = "w"\nurl = "ftp://x"',
            "destinations.0.dicomweb.url",
            "http",
        ),
        ('[[destinations]]\nkind = "carrier-pigeon"\nname = "x"', "destinations.0", "dimse"),
        ('[[rules]]\nname = "r"\npipelines = ["nope"]', "rules.0.pipelines", "allowed:"),
        ('[[rules]]\nname = "r"\ndestinations = ["ghost"]', "ghost", "configured"),
        (
            '[[rules]]\nname = "r"\n[rules.match.tags]\nBodyPartExamined = { regex = "(" }',
            "regex",
            "invalid regex",
        ),
        ("[workers]\nconcurrency = 0", "workers.concurrency", "greater than or equal to 1"),
        # A rule's typo: a tag keyword never matched without a word (pydicom answers an
        # unknown keyword as absent), a SOP class keyword made every run unroutable.
        (
            '[[rules]]\nname = "r"\n[rules.match.tags]\nBodyPartExamind = "HEAD"',
            "rules.0.match.tags",
            "'BodyPartExamind' is not a DICOM keyword (did you mean BodyPartExamined",
        ),
        (
            '[[rules]]\nname = "r"\n[rules.match.tags]\nReferencedImageSequence = "x"',
            "rules.0.match.tags",
            "ReferencedImageSequence (SQ) cannot be matched as text",
        ),
        (
            '[[rules]]\nname = "r"\n[rules.match]\nsop_class_uid = ["XRayAngiograhicImageStorage"]',
            "rules.0.match.sop_class_uid",
            "(did you mean XRayAngiographicImageStorage",
        ),
        (
            '[[rules]]\nname = "r"\n[rules.match]\nsop_class_uid = ["1.2.840..1"]',
            "rules.0.match.sop_class_uid",
            "'1.2.840..1' is not a UID",
        ),
        (
            '[[rules]]\nname = "r"\n[rules.match]\nmodality = ["xa"]',
            "rules.0.match.modality",
            "'xa' is not a Modality code",
        ),
        (
            '[[rules]]\nname = "r"\n[rules.match]\nframe_rate_min = 10\nframe_rate_max = 5',
            "rules.0.match",
            "frame_rate_min 10 is above frame_rate_max 5",
        ),
        ('[[rules]]\nname = "r"\npipelines = ["minip", "minip"]', "rules.0.pipelines", "more than"),
        ('[[rules]]\nname = "r"\n[[rules]]\nname = "r"', "rule names must be unique", "['r']"),
        (
            '[[destinations]]\nkind = "dimse"\nname = "*"\nhost = "h"\nport = 1\nae_title = "A"',
            "cannot be named '*'",
            "means all of them",
        ),
        ("[completion]\nquiet_period_s = inf", "completion.quiet_period_s", "finite number"),
        ('[engine.queues]\nminip = ""', "engine.queues.minip", "at least 1 character"),
        # Pipeline options are checked as the pipeline checks them (pipelines.options):
        # each of these failed every job of its pipeline, or was ignored without a word.
        (
            '[workers.pipeline_options.xa_coronary]\nmin_component_px = "many"',
            "workers.pipeline_options.xa_coronary",
            "min_component_px must be a whole number, not 'many'",
        ),
        (  # TOML reads an integer of any size; past a float's range it raised
            f"[workers.pipeline_options.xa_coronary]\nmin_component_px = 1{'0' * 400}",
            "workers.pipeline_options.xa_coronary",
            "min_component_px must be a whole number",
        ),
        (
            "[workers.pipeline_options.xa_coronary]\ntreshold = 0.3",
            "workers.pipeline_options.xa_coronary",
            "unknown xa_coronary option(s) treshold; allowed: min_component_px, threshold",
        ),
        (
            "[workers.pipeline_options.xa_coronary]\nthreshold = 1.5",
            "xa_coronary",
            "threshold must be above 0 and below 1",
        ),
        ("[workers.pipeline_options.dsa_av]\nsite = 1", "dsa_av", "option(s) site; it takes none"),
        ("[workers.pipeline_options.minip]\nx = 1", "minip", "it takes none"),
        (
            "[workers.pipeline_options.dsa_perfusion]\ndrift_corection = true",
            "dsa_perfusion",
            "allowed: drift_correction,",
        ),
        ("[workers.pipeline_options.dsa_perfusion]\nsigma_mm = true", "sigma_mm", "a number"),
        (
            '[workers.pipeline_options.dsa_perfusion]\nmethod = "fft"',
            "dsa_perfusion",
            "method='fft': allowed auto, ssvd, csvd, osvd, tikhonov",
        ),
        (
            '[workers.pipeline_options.dsa_perfusion]\nica_site_rules = [{ protocol = "(" }]',
            "dsa_perfusion",
            "not a regex",
        ),
        (
            "[workers.pipeline_options.rotational_dla.classical]\nk_lo = 3",
            "rotational_dla",
            "classical: unknown constant(s) k_lo; allowed: fwhm,",
        ),
        (
            "[workers.pipeline_options.rotational_dla.classical]\nscales_mm = [0.5, -1]",
            "rotational_dla",
            "classical.scales_mm[1] must be above 0",
        ),
        (
            "[workers.pipeline_options.rotational_dla]\nslab = 0",
            "rotational_dla",
            "slab must be at least 1",
        ),
    ],
)
def test_bad_config_names_key_and_allowed_values(
    tmp_path: Path, toml: str, key: str, allowed: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    assert key in str(err.value) and allowed in str(err.value), str(err.value)


def test_cli_fails_at_start_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("port = -1\n")
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "port" in out.stderr


def test_pipeline_options_are_checked_where_they_are_read(tmp_path: Path) -> None:
    """The node and the pipelines read one declaration (``pipelines.options``): every
    built-in pipeline has one, the values a pipeline gets are those the node let
    through, and a pipeline called without the node (``dicom-node process``, the
    benchmarks) refuses what the node's start refuses."""
    from pipelines.base import BUILTIN, PipelineContext, PipelineError, get
    from pipelines.options import DECLARED, ROTATIONAL_CLASSICAL, checked
    from pipelines.rotational import CLASSICAL_DEFAULTS

    assert set(DECLARED) == set(BUILTIN)
    assert CLASSICAL_DEFAULTS is ROTATIONAL_CLASSICAL
    good = {
        "dsa_perfusion": {"svd_threshold": 0.15, "ica_site_rules": [{"seed": [0.5, 0.5]}]},
        "xa_coronary": {"threshold": 0.4, "min_component_px": 20.0},
        "rotational_dla": {"classical": {"k_low": 3, "scales_mm": [0.5, 1]}, "slab": 8},
    }
    settings = load_settings(None, environ={}, workers={"pipeline_options": good})
    assert settings.workers.pipeline_options == good  # the jobs get them as written
    assert checked("xa_coronary", good["xa_coronary"])["min_component_px"] == 20
    assert checked("rotational_dla", good["rotational_dla"])["classical"] == {
        "k_low": 3.0,
        "scales_mm": (0.5, 1.0),
    }
    run = load_run([save(xa_run(frames=4, rows=32, cols=32), tmp_path)]).run
    for name in ("minip", "dsa_av", "dsa_ia", "xa_coronary", "dsa_perfusion", "rotational_dla"):
        with pytest.raises(PipelineError, match=f"unknown {name} option"):
            get(name)(run, PipelineContext(options={"colour": "red"}))


def test_options_that_alone_fill_a_workflow_input_stop_the_start() -> None:
    """With the jobs going to Temporal, options past ``engine.max_input_bytes`` would
    fail every job of their pipeline before Temporal is asked: the start is refused."""
    rules = [{"protocol": "a" * 40_000, "seed": [0.5, 0.5]}]
    options = {"pipeline_options": {"dsa_perfusion": {"ica_site_rules": rules}}}
    assert load_settings(None, environ={}, workers=options)  # the embedded engine: no limit
    with pytest.raises(ConfigError, match=r"dsa_perfusion: 400\d\d bytes as a workflow input"):
        load_settings(
            None,
            environ={},
            workers=options,
            engine={"kind": "temporal", "max_input_bytes": 32768},
        )


def _features(ds) -> RunFeatures:  # type: ignore[no-untyped-def]
    return RunFeatures.from_headers([ds], "MODALITY")


def test_default_rules_tell_kinds_apart() -> None:
    rules = effective_rules(load_settings(None, environ={}))
    assert route(rules, _features(xa_run(frames=4))).rule.name == "cerebral-dsa"  # type: ignore[union-attr]
    cine = xa_run(frames=4, subtracted=False, body_part="HEART")
    assert route(rules, _features(cine)).rule.name == "coronary-cine"  # type: ignore[union-attr]
    fast = xa_run(frames=4, subtracted=False, body_part="", frame_time_ms=66.7)
    assert route(rules, _features(fast)).rule.name == "coronary-cine-by-rate"  # type: ignore[union-attr]
    slow_native = xa_run(frames=4, subtracted=False, body_part="", frame_time_ms=500)
    assert route(rules, _features(slow_native)).rule is None  # not guessed
    single = xa_run(frames=1)
    assert route(rules, _features(single)).rule is None
    vol = ct_series(slices=4)
    for ds in vol:
        ds.BodyPartExamined = "HEAD"
    d = route(rules, RunFeatures.from_headers(vol))
    assert d.rule is not None and d.rule.name == "rotational-3d"


def test_custom_rule_by_calling_aet_and_regex(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        '[[rules]]\nname = "suite2"\npipelines = ["minip"]\n[rules.match]\n'
        'calling_aet = ["SUITE2 "]\nimage_type = ["SUBTRACTION"]\n'
        '[rules.match.tags]\nSeriesDescription = { regex = "(?i)carotid" }\n'
    )
    rules = effective_rules(load_settings(cfg, environ={}))
    ds = xa_run(frames=3)
    ds.SeriesDescription = "L Carotid DSA"
    # an AE title's trailing space is padding (PS3.5 6.2): "SUITE2 " never matched
    assert route(rules, RunFeatures.from_headers([ds], "SUITE2")).pipelines == ["minip"]
    d = route(rules, RunFeatures.from_headers([ds], "SUITE1"))
    assert d.rule is None and "calling AE" in d.explain()


def test_route_explain_cli(tmp_path: Path) -> None:
    path = save(xa_run(frames=3), tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "route", "--explain", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "rule 'cerebral-dsa': MATCH" in out.stdout and "[x] subtracted is True" in out.stdout


def test_route_without_runs_checks_the_settings_and_lists_the_rules(tmp_path: Path) -> None:
    """What an operator runs on a changed settings file before the restart: the start's
    own checks, and the rules in the order they are tried."""

    def route_cli(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "route", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    rules = '[[rules]]\nname = "{}"\npipelines = ["minip"]\n[rules.match.tags]\n{} = "HEAD"\n'
    good.write_text(rules.format("a", "BodyPartExamined") + rules.format("b", "StudyDescription"))
    out = route_cli(good)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "valid" in lines[0] and lines[1].startswith("  1. a: pipelines ['minip']")
    assert lines[2].startswith("  2. b:") and "StudyDescription" in lines[2]
    bad.write_text(rules.format("a", "BodyPartExamind"))
    out = route_cli(bad)
    assert out.returncode == 2 and "did you mean BodyPartExamined" in out.stderr, out.stderr


REAL_FILES = sorted(REAL_DATA.rglob("*.dcm")) if REAL_DATA.exists() else []


@pytest.mark.skipif(not REAL_FILES, reason="../shared/data/real is not present")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_vendor_files_route_and_decode(path: Path) -> None:
    """Real files: compressed syntaxes, private tags, Mask Operation NONE, retired curves."""
    ds = dcmread(path, stop_before_pixels=True)
    decision = route(
        effective_rules(load_settings(None, environ={})), RunFeatures.from_headers([ds])
    )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        # the 96-frame 30 fps cardiac XA (Mask Operation NONE) is coronary cine, not DSA
        assert decision.rule is not None and decision.rule.name.startswith("coronary"), (
            decision.explain()
        )
        loaded = load_run([path])
        assert loaded.run.pixels.shape == (frames, ds.Rows, ds.Columns)
        assert loaded.run.meta.frame_times_s is not None
        assert loaded.run.meta.frame_times_s[1] == pytest.approx(float(ds.FrameTime) / 1000)
        assert loaded.run.meta.subtracted is False
    else:
        assert decision.rule is None  # single frames are stored, not guessed at
        full = dcmread(path)
        if "JPLY" in path.name:
            # 12-bit JPEG Extended that no installed decoder reads: a clear, permanent error
            with pytest.raises(RunError, match="cannot decode pixel data"):
                decode_pixels(full, path)
        else:
            assert decode_pixels(full, path).shape[-2:] == (ds.Rows, ds.Columns)


def test_native_run_with_mask_subtraction_is_log_subtracted(tmp_path: Path) -> None:
    import numpy as np
    from pydicom.dataset import Dataset

    ds = xa_run(frames=5, subtracted=False)
    live = ds.pixel_array.astype(np.float64)
    item = Dataset()
    item.MaskOperation = "AVG_SUB"
    item.MaskFrameNumbers = [1, 2]
    item.ContrastFrameAveraging = 1
    ds.MaskSubtractionSequence = [item]
    loaded = load_run([save(ds, tmp_path)])
    assert loaded.run.meta.subtracted and loaded.run.meta.extra["mask_subtracted"]
    mask = live[:2].mean(axis=0)
    expected = 2048 + 1024 * (np.log1p(live) - np.log1p(mask))
    assert np.allclose(loaded.run.pixels, expected, atol=1e-2)
    assert RunFeatures.from_headers([ds]).subtracted


def test_the_node_s_own_results_are_not_routed_again() -> None:
    from dicom_node import MANUFACTURER
    from dicom_node.routing import OWN_RESULT

    headers = ct_series()
    assert route(
        effective_rules(load_settings(None, environ={})), RunFeatures.from_headers(headers)
    ).pipelines == ["rotational_dla"]
    for ds in headers:
        ds.Manufacturer = MANUFACTURER
    decision = route(
        effective_rules(load_settings(None, environ={})), RunFeatures.from_headers(headers)
    )
    assert decision.pipelines == [] and decision.excluded == OWN_RESULT
    assert OWN_RESULT in decision.explain()


def test_results_sent_back_to_the_node_are_not_processed_again(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A node whose results come back to it (here it is its own destination, as when a
    PACS routes every CT to the node): the rotational pipeline's CT volumes would
    route to the rotational pipeline again, and its results again, without end.
    They are stored and reported unrouted, with the reason; one job in all."""
    from pynetdicom import AE

    from dicom_node.routing import OWN_RESULT
    from tests.conftest import free_port, wait_for
    from training.phantoms import rotational

    port = free_port()
    node = make_node(
        port=port,
        destinations=[
            {
                "kind": "dimse",
                "name": "self",
                "host": "127.0.0.1",
                "port": port,
                "ae_title": "ANGIO_NODE",
            }
        ],
    )
    folder = rotational.generate(22, size=32).write(tmp_path / "suite")[0].parent
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", port, ae_title=node.settings.ae_title)
    for path in sorted((folder / "rotational_ct").glob("*.dcm")):
        assert int(assoc.send_c_store(dcmread(path)).Status) == 0
    assoc.release()

    def back() -> list:  # type: ignore[type-arg]
        """The unrouted runs, once every result is sent (or refused: the node does not
        store SR) and every run it got back is settled."""
        outbox = node.db.query("SELECT state FROM outbox")
        runs = node.db.query("SELECT state, reason FROM runs")
        settled = outbox and all(r["state"] in ("sent", "failed") for r in outbox)
        if not settled or any(r["state"] in ("receiving", "complete") for r in runs):
            return []
        return [r for r in runs if r["state"] == "unrouted"]

    rows = wait_for(back, 180, what="the results back at the node")
    assert len(rows) == 3  # the SEG, the DLA angiogram's CT series, its MIP
    assert all(r["reason"] == OWN_RESULT for r in rows), [r["reason"] for r in rows]
    jobs = node.db.query("SELECT pipeline FROM jobs")
    assert [j["pipeline"] for j in jobs] == ["rotational_dla"]


def test_the_readme_s_settings_example_loads() -> None:
    """The settings file a reader copies from the README is one the node starts with
    (a check the settings gained, storage commitment peers allowed to call, once
    refused it)."""
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = tomllib.loads(re.findall(r"```toml\n(.*?)```", readme, re.S)[0])
    settings = Settings.model_validate(example)
    assert settings.storage_commitment.report_to and settings.destinations
