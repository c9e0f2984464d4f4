"""`gradient-nb bench verify --precisions` prints the per-precision calibration as one JSON object.

Tiny counts (the README's figures come from the defaults): the shape of the report, honest serving
not flagged, and the cheap attacks caught, all through the real serve-then-``verify_stage`` path.
"""

from __future__ import annotations

import json

from gradient_nb.bench import verify as bench


def test_precision_calibration_reports_honest_runs_and_detection(capsys) -> None:
    argv = ["--precisions", "float16", "--honest", "3", "--runs", "3", "--lengths", "12",
            "--attacks", "skip_layer,random_states"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "verify" and report["honest_lengths"] == [12]
    prec = report["precisions"]["float16"]
    assert (prec["dtype"], prec["quantization"]) == ("float16", None)

    honest = prec["honest"]
    assert honest["runs"] == 3 and honest["false_positives"] == 0
    assert honest["max_err"]["worst"] <= honest["max_err"]["limit"]
    assert honest["mean_err"]["worst"] <= honest["mean_err"]["limit"]
    assert honest["min_overlap"]["worst"] >= honest["min_overlap"]["limit"]

    assert set(prec["attacks"]) == {"skip_layer", "random_states"}
    for attack in prec["attacks"].values():
        assert attack["runs"] == 3 and sorted(attack["by_stage"]) == ["0:10", "10:20", "20:30"]
        assert attack["caught"] == 3, attack
