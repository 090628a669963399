"""Defects found by the fifteenth round's audit (6 December) in how the daemon process starts,
stops and follows its files: each reproduced with a real ``lrwatch daemon`` process (or a
real daemon serving HTTP on a loopback port the test picks)."""

from __future__ import annotations

import json
import random
from typing import Any

from daemon_helpers import assert_balanced, make_record


# --- records glued together on one line are counted one by one --------------------------------
def test_records_glued_on_one_line_are_each_counted_as_refused(run_daemon: Any) -> None:
    """``curl -d @predictions.ndjson`` drops the newlines: N records arrive glued together on
    one line. They were refused (NDJSON is one record per line) but counted as one rejected
    record, so ``lrwatch_ingest_received_total`` said one record came where N were sent."""
    r = run_daemon()
    rng = random.Random(154)
    recs = [json.dumps(make_record(rng, i)) for i in range(5)]
    status, out = r.post("/v1/predictions", "".join(recs))
    assert status == 400 and out["reasons"] == {"invalid_json": 5}, out
    assert "5 records glued together on one line" in out["error"], out
    # glued with spaces between, after a good line, and ending in a cut record: 1 + 3 + 1
    body = recs[0] + "\n" + recs[1] + " " + recs[2] + "  " + recs[3][:20] + "\n" + recs[4]
    status, out = r.post("/v1/predictions", body)
    assert status == 200 and out["accepted"] == 2 and out["reasons"] == {"invalid_json": 3}, out
    # junk after one record is one rejected record, as before
    status, out = r.post("/v1/predictions", recs[0] + " x")
    assert status == 400 and out["reasons"] == {"invalid_json": 1}, out
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "invalid_json"}) == 9
    assert r.metric("lrwatch_ingest_received_total") == 11
    assert_balanced(r.daemon)
