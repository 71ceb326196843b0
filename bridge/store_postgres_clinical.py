"""PostgreSQL storage of the clinical features: NEWS2 observations, scores and per-patient state,
FHIR look-ups, the alarm-fatigue report's queries. The twin of
:mod:`bridge.store_sqlite_clinical`, mixed into :class:`bridge.store_postgres.PostgresTransaction`
and :class:`bridge.store_postgres.PostgresStore` (whose ``_conn``, ``_rows``, ``_query`` and
``_page_rows`` it uses); the schema is in ``bridge.store_postgres.MIGRATIONS``.

Threads: the transaction methods run on the writer thread, the store methods on any thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bridge.records import News2Record, ObservationRecord, PatientInputs
from bridge.store import Page, cursor_parts, page_limit
from firstcare import news2
from firstcare.payloads import format_ts


def news2_row_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "patient_id": row["patient_id"], "hospital_id": row["hospital_id"],
            **json.loads(row["body"])}


def patients_inputs(rows: Any, patient_ids: Sequence[str]) -> dict[str, PatientInputs]:
    """The NEWS2 inputs of these patients (``rows(sql, params)`` runs a query to dict rows)."""
    hospitals = {r["patient_id"]: r["hospital_id"] for r in rows(
        "SELECT patient_id, hospital_id FROM patients WHERE patient_id = ANY(%s)", (list(patient_ids),))}
    result = {pid: PatientInputs(hospitals.get(pid), {}, 1) for pid in patient_ids}
    for r in rows("SELECT * FROM latest_vitals WHERE patient_id = ANY(%s) AND metric = ANY(%s)",
                  (list(patient_ids), sorted(news2.DEVICE_PARAMETERS))):
        result[r["patient_id"]].inputs[r["metric"]] = news2.Input(r["value"], r["ts_ms"],
                                                                   f"{r['device_type']}/{r['device_id']}")
    # the newest observation of each (patient, kind): by observation time, then entry order
    for r in rows("SELECT DISTINCT ON (patient_id, kind) * FROM observations WHERE patient_id = ANY(%s)"
                  " ORDER BY patient_id, kind, ts_ms DESC, id DESC", (list(patient_ids),)):
        e = result[r["patient_id"]]
        if r["kind"] == "spo2_scale":
            result[r["patient_id"]] = PatientInputs(e.hospital_id, e.inputs, int(json.loads(r["value"])))
        else:
            e.inputs[r["kind"]] = news2.Input(json.loads(r["value"]), r["ts_ms"], f"observation:{r['recorded_by']}")
    return result


class ClinicalTransactionMixin:
    _conn: Any
    _rows: Any
    flush: Any
    # set by PostgresTransaction: NEWS2 writes buffered until flush (nothing in a transaction reads them back)
    _news2_rows: list[tuple[Any, ...]]
    _news2_states: dict[str, tuple[str, str, int | None]]
    _news2_ids: list[int]
    _news2_reserved: int

    def news2_of(self, patient_ids: Iterable[str]) -> dict[str, News2Record]:
        """The NEWS2 inputs of these patients and what was last decided about them."""
        self.flush()
        pids = sorted(set(patient_ids))
        if not pids:
            return {}
        known = patients_inputs(self._rows, pids)
        state = {r["patient_id"]: r for r in self._rows(
            "SELECT patient_id, signature, expiry_ms FROM news2_state WHERE patient_id = ANY(%s)", (pids,))}
        return {pid: News2Record(known[pid], state[pid]["signature"] if pid in state else None,
                                 state[pid]["expiry_ms"] if pid in state else None) for pid in pids}

    def save_news2_state(self, patient_id: str, signature: str, expiry_ms: int | None) -> None:
        self._news2_states[patient_id] = (patient_id, signature, expiry_ms)  # written by flush_news2

    def insert_observations(self, records: Iterable[ObservationRecord]) -> list[int]:
        ids = []
        for o in records:
            row = self._conn.execute(
                "INSERT INTO observations (patient_id, hospital_id, kind, value, ts_ms, recorded_ms, recorded_by, note)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (o.patient_id, o.hospital_id, o.kind, json.dumps(o.value), o.ts_ms, o.recorded_ms, o.recorded_by,
                 o.note)).fetchone()
            ids.append(int(row[0]))
        return ids

    def insert_news2(self, patient_id: str, hospital_id: str, s: news2.Score, signature: str, body: str) -> int:
        """Buffered, like the readings (one round trip per score was a third of the writer's
        time): the id comes from a block of the table's sequence reserved for this transaction
        (ids it does not use are skipped, as a rolled-back insert skips one)."""
        if not self._news2_ids:
            block = min(1024, max(16, 2 * self._news2_reserved))
            self._news2_reserved += block
            rows = self._conn.execute("SELECT nextval(pg_get_serial_sequence('news2_scores', 'id'))"
                                      " FROM generate_series(1, %s)", (block,)).fetchall()
            self._news2_ids = sorted((int(r[0]) for r in rows), reverse=True)
        score_id = self._news2_ids.pop()
        self._news2_rows.append((score_id, patient_id, hospital_id, s.computed_ms, s.total, s.band, s.complete,
                                 s.max_part, s.spo2_scale, signature, body))
        return score_id

    def flush_news2(self) -> None:
        """Write the buffered scores and NEWS2 states (pipelined ``executemany``)."""
        scores, self._news2_rows = self._news2_rows, []
        states, self._news2_states = self._news2_states, {}
        with self._conn.cursor() as cur:
            if scores:
                cur.executemany(
                    "INSERT INTO news2_scores (id, patient_id, hospital_id, computed_ms, total, band, complete,"
                    " max_part, spo2_scale, signature, body) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    scores)
            if states:
                cur.executemany(
                    "INSERT INTO news2_state (patient_id, signature, expiry_ms) VALUES (%s, %s, %s)"
                    " ON CONFLICT (patient_id) DO UPDATE SET signature=excluded.signature,"
                    " expiry_ms=excluded.expiry_ms", [states[p] for p in sorted(states)])


class ClinicalStoreMixin:
    _query: Any
    _page_rows: Any
    _scoped: Any

    # --- NEWS2 ---------------------------------------------------------------------------

    def patient_news2_inputs(self, patient_id: str) -> PatientInputs:
        return patients_inputs(self._query, [patient_id])[patient_id]

    def news2_history(self, patient_id: str, since_ms: int | None, until_ms: int | None, limit: int,
                      cursor: str | None) -> Page:
        limit = page_limit(limit)
        sql = "SELECT * FROM news2_scores WHERE patient_id = %s"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND computed_ms >= %s"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND computed_ms < %s"
            params.append(until_ms)
        before = cursor_parts(cursor, 2)
        if before is not None:
            sql += " AND (computed_ms, id) < (%s, %s)"
            params.extend(before)
        rows, last = self._page_rows(sql, params, "computed_ms DESC, id DESC", limit)
        return Page([news2_row_json(r) for r in rows], f"{last['computed_ms']}.{last['id']}" if last else None)

    def news2_score(self, score_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM news2_scores WHERE id = %s", (score_id,))
        return news2_row_json(rows[0]) if rows else None

    def news2_scores_between(self, patient_id: str, since_ms: int | None, until_ms: int | None,
                             after: tuple[int, int] | None, limit: int) -> list[dict[str, Any]]:
        """Oldest first, for FHIR searches: ``after`` is an exclusive (computed_ms, id) position."""
        sql = "SELECT * FROM news2_scores WHERE patient_id = %s"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND computed_ms >= %s"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND computed_ms < %s"
            params.append(until_ms)
        if after is not None:
            sql += " AND (computed_ms, id) > (%s, %s)"
            params.extend(after)
        rows = self._query(sql + " ORDER BY computed_ms, id LIMIT %s", [*params, limit])
        return [{**news2_row_json(r), "computed_ms": r["computed_ms"]} for r in rows]

    # --- FHIR: readings by their stable id ----------------------------------------------------

    def reading_by_id(self, reading_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM readings WHERE id = %s", (reading_id,))
        return _reading_row(rows[0]) if rows else None

    def readings_between(self, patient_id: str, since_ms: int | None, until_ms: int | None,
                         after: tuple[int, int] | None, limit: int, metrics: Sequence[str] | None = None
                         ) -> list[dict[str, Any]]:
        """Oldest first, for FHIR searches: ``after`` is a (ts_ms, id) position to start from;
        ``metrics`` keeps readings holding at least one of them."""
        sql = "SELECT * FROM readings WHERE patient_id = %s"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND ts_ms >= %s"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND ts_ms < %s"
            params.append(until_ms)
        if metrics:
            sql += " AND metrics ?| %s"
            params.append(list(metrics))
        if after is not None:
            sql += " AND (ts_ms, id) >= (%s, %s)"
            params.extend(after)
        rows = self._query(sql + " ORDER BY ts_ms, id LIMIT %s", [*params, limit])
        return [_reading_row(r) for r in rows]

    # --- alarm-fatigue report -------------------------------------------------------------------

    def alarms_raised_between(self, hospitals: frozenset[str] | None, hospital_id: str | None, since_ms: int,
                              until_ms: int) -> list[dict[str, Any]]:
        params: list[Any] = [since_ms, until_ms]
        sql = self._scoped(
            "SELECT id, rule_id, kind, priority, state, patient_id, hospital_id, device_type, device_id,"
            " raised_ms, acknowledged_ms, escalated_ms, resolved_ms FROM alerts"
            " WHERE raised_ms >= %s AND raised_ms < %s",
            params, "hospital_id", hospitals)
        if hospital_id is not None:
            sql += " AND hospital_id = %s"
            params.append(hospital_id)
        return [dict(r) for r in self._query(sql + " ORDER BY raised_ms", params)]

    def patient_days(self, hospitals: frozenset[str] | None, hospital_id: str | None, since_ms: int,
                     until_ms: int) -> int:
        """Monitored patient-days: (patient, UTC calendar day) pairs with at least one reading in
        the window, counted in the database (the patient index, one partition per day)."""
        params: list[Any] = []
        sql = self._scoped("SELECT patient_id FROM patients WHERE true", params, "hospital_id", hospitals)
        if hospital_id is not None:
            sql += " AND hospital_id = %s"
            params.append(hospital_id)
        rows = self._query(
            f"SELECT count(*) AS n FROM ({sql}) p CROSS JOIN LATERAL ("
            "  SELECT DISTINCT r.ts_ms / 86400000 AS day FROM readings r"
            "  WHERE r.patient_id = p.patient_id AND r.ts_ms >= %s AND r.ts_ms < %s) d",
            [*params, since_ms, until_ms])
        return int(rows[0]["n"])


def _reading_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "patient_id": r["patient_id"], "hospital_id": r["hospital_id"],
            "device_type": r["device_type"], "device_id": r["device_id"], "seq": r["seq"], "ts_ms": r["ts_ms"],
            "received_ms": r["received_ms"], "metrics": r["metrics"], "ts": format_ts(r["ts_ms"])}
