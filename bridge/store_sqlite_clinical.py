"""SQLite storage of the clinical features: NEWS2 observations, scores and per-patient state,
FHIR look-ups, the alarm-fatigue report's queries. Mixed into
:class:`bridge.store_sqlite.SQLiteTransaction` and :class:`bridge.store_sqlite.SQLiteStore`,
whose connection and helpers they use (``_conn``, ``_query``, ``_page_rows``), so the schema
stays in one ``MIGRATIONS`` list.

Threads: the transaction methods run on the writer thread (inside ``Store.transaction``), the
store methods on any thread (each has its own read connection).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from bridge.records import News2Record, ObservationRecord, PatientInputs
from firstcare import news2
from firstcare.payloads import format_ts


def news2_row_json(row: sqlite3.Row) -> dict[str, Any]:
    body = json.loads(row["body"])
    return {"id": row["id"], "patient_id": row["patient_id"], "hospital_id": row["hospital_id"], **body}


class ClinicalTransactionMixin:
    _conn: sqlite3.Connection

    def news2_of(self, patient_ids: Iterable[str]) -> dict[str, News2Record]:
        """The NEWS2 inputs of these patients and what was last decided about them."""
        result: dict[str, News2Record] = {}
        q = lambda sql, params=(): self._conn.execute(sql, params).fetchall()  # noqa: E731
        for pid in patient_ids:
            known = _patients_inputs(q, pid).get(pid) or PatientInputs(None, {}, 1)
            row = self._conn.execute("SELECT signature, expiry_ms FROM news2_state WHERE patient_id=?",
                                     (pid,)).fetchone()
            result[pid] = News2Record(known, row[0] if row else None, row[1] if row else None)
        return result

    def save_news2_state(self, patient_id: str, signature: str, expiry_ms: int | None) -> None:
        self._conn.execute("INSERT INTO news2_state (patient_id, signature, expiry_ms) VALUES (?,?,?)"
                           " ON CONFLICT (patient_id) DO UPDATE SET signature=excluded.signature,"
                           " expiry_ms=excluded.expiry_ms", (patient_id, signature, expiry_ms))

    def insert_observations(self, records: Iterable[ObservationRecord]) -> list[int]:
        ids = []
        for o in records:
            cur = self._conn.execute(
                "INSERT INTO observations (patient_id, hospital_id, kind, value, ts_ms, recorded_ms, recorded_by, note)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (o.patient_id, o.hospital_id, o.kind, json.dumps(o.value), o.ts_ms, o.recorded_ms, o.recorded_by,
                 o.note))
            ids.append(int(cur.lastrowid or 0))
        return ids

    def insert_news2(self, patient_id: str, hospital_id: str, s: news2.Score, signature: str, body: str) -> int:
        cur = self._conn.execute(
            "INSERT INTO news2_scores (patient_id, hospital_id, computed_ms, total, band, complete, max_part,"
            " spo2_scale, signature, body) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (patient_id, hospital_id, s.computed_ms, s.total, s.band, int(s.complete), s.max_part, s.spo2_scale,
             signature, body))
        return int(cur.lastrowid or 0)


def _observation_input(kind: str, raw: str, ts_ms: int, by: str) -> news2.Input:
    return news2.Input(json.loads(raw), ts_ms, f"observation:{by}")


class ClinicalStoreMixin:
    _writer: sqlite3.Connection

    _query: Any  # SQLiteStore's helpers
    _page_rows: Any

    # --- NEWS2 ---------------------------------------------------------------------------

    def patient_news2_inputs(self, patient_id: str) -> PatientInputs:
        found = _patients_inputs(self._query, patient_id).get(patient_id)
        return found or PatientInputs(None, {}, 1)

    def news2_history(self, patient_id: str, since_ms: int | None, until_ms: int | None, limit: int,
                      cursor: str | None) -> Any:
        from bridge.store import Page
        from bridge.store_sqlite import _cursor_parts, _limit

        limit = _limit(limit)
        sql = "SELECT * FROM news2_scores WHERE patient_id=?"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND computed_ms >= ?"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND computed_ms < ?"
            params.append(until_ms)
        before = _cursor_parts(cursor, 2)
        if before is not None:
            sql += " AND (computed_ms, id) < (?, ?)"
            params.extend(before)
        rows, last = self._page_rows(sql, params, "computed_ms DESC, id DESC", limit)
        return Page([news2_row_json(r) for r in rows], f"{last['computed_ms']}.{last['id']}" if last else None)

    def news2_score(self, score_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM news2_scores WHERE id=?", (score_id,))
        return news2_row_json(rows[0]) if rows else None

    def news2_scores_between(self, patient_id: str, since_ms: int | None, until_ms: int | None,
                             after: tuple[int, int] | None, limit: int) -> list[dict[str, Any]]:
        """Oldest first, for FHIR searches: ``after`` is an exclusive (computed_ms, id) position."""
        sql = "SELECT * FROM news2_scores WHERE patient_id=?"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND computed_ms >= ?"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND computed_ms < ?"
            params.append(until_ms)
        if after is not None:
            sql += " AND (computed_ms, id) > (?, ?)"
            params.extend(after)
        rows = self._query(sql + " ORDER BY computed_ms, id LIMIT ?", [*params, limit])
        return [{**news2_row_json(r), "computed_ms": r["computed_ms"]} for r in rows]

    # --- FHIR: readings by their stable id ----------------------------------------------------

    def reading_by_id(self, reading_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM readings WHERE id=?", (reading_id,))
        return _reading_row(rows[0]) if rows else None

    def readings_between(self, patient_id: str, since_ms: int | None, until_ms: int | None,
                         after: tuple[int, int] | None, limit: int, metrics: Sequence[str] | None = None
                         ) -> list[dict[str, Any]]:
        """Oldest first, for FHIR searches: ``after`` is an exclusive (ts_ms, id) position;
        ``metrics`` keeps readings holding at least one of them."""
        sql = "SELECT * FROM readings WHERE patient_id=?"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND ts_ms >= ?"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND ts_ms < ?"
            params.append(until_ms)
        if metrics:
            sql += " AND (" + " OR ".join("json_extract(metrics, ?) IS NOT NULL" for _ in metrics) + ")"
            params.extend(f'$."{m}"' for m in metrics)
        if after is not None:
            sql += " AND (ts_ms, id) >= (?, ?)"
            params.extend(after)
        rows = self._query(sql + " ORDER BY ts_ms, id LIMIT ?", [*params, limit])
        return [_reading_row(r) for r in rows]

    # --- alarm-fatigue report -------------------------------------------------------------------

    def alarms_raised_between(self, hospitals: frozenset[str] | None, hospital_id: str | None, since_ms: int,
                              until_ms: int) -> list[dict[str, Any]]:
        sql = ("SELECT id, rule_id, kind, priority, state, patient_id, hospital_id, device_type, device_id,"
               " raised_ms, acknowledged_ms, escalated_ms, resolved_ms FROM alerts"
               " WHERE raised_ms >= ? AND raised_ms < ?")
        params: list[Any] = [since_ms, until_ms]
        if hospitals is not None:
            sql += f" AND hospital_id IN ({','.join('?' for _ in hospitals)})" if hospitals else " AND 0"
            params.extend(sorted(hospitals))
        if hospital_id is not None:
            sql += " AND hospital_id=?"
            params.append(hospital_id)
        return [dict(r) for r in self._query(sql + " ORDER BY raised_ms", params)]

    def patient_days(self, hospitals: frozenset[str] | None, hospital_id: str | None, since_ms: int,
                     until_ms: int) -> int:
        """Monitored patient-days: (patient, UTC calendar day) pairs with at least one reading in
        the window. One index seek per patient and day, never a scan of the readings."""
        sql = "SELECT patient_id FROM patients WHERE 1=1"
        params: list[Any] = []
        if hospitals is not None:
            sql += f" AND hospital_id IN ({','.join('?' for _ in hospitals)})" if hospitals else " AND 0"
            params.extend(sorted(hospitals))
        if hospital_id is not None:
            sql += " AND hospital_id=?"
            params.append(hospital_id)
        day = 86_400_000
        days = 0
        for (pid,) in self._query(sql, params):
            start = since_ms
            while start < until_ms:
                end = min((start // day + 1) * day, until_ms)
                if self._query("SELECT 1 FROM readings WHERE patient_id=? AND ts_ms >= ? AND ts_ms < ? LIMIT 1",
                               (pid, start, end)):
                    days += 1
                start = end
        return days


def _latest_observations(conn_query: Any, patient_id: str | None) -> list[sqlite3.Row]:
    where = "WHERE patient_id=?" if patient_id is not None else ""
    params = (patient_id,) if patient_id is not None else ()
    # the newest observation of each (patient, kind): by observation time, then entry order
    return conn_query(
        "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY patient_id, kind ORDER BY ts_ms DESC, id DESC)"
        f" AS rn FROM observations {where}) WHERE rn = 1", params)


def _patients_inputs(q: Any, patient_id: str | None) -> dict[str, PatientInputs]:
    metrics = sorted(news2.DEVICE_PARAMETERS)
    where = " AND patient_id=?" if patient_id is not None else ""
    params: list[Any] = [*metrics, *([patient_id] if patient_id is not None else [])]
    result: dict[str, PatientInputs] = {}
    hospitals = {r[0]: r[1] for r in q("SELECT patient_id, hospital_id FROM patients"
                                       + (" WHERE patient_id=?" if patient_id is not None else ""),
                                       (patient_id,) if patient_id is not None else ())}

    def entry(pid: str) -> PatientInputs:
        if pid not in result:
            result[pid] = PatientInputs(hospitals.get(pid), {}, 1)
        return result[pid]

    if patient_id is not None and patient_id in hospitals:
        entry(patient_id)
    for r in q(f"SELECT * FROM latest_vitals WHERE metric IN ({','.join('?' for _ in metrics)}){where}", params):
        entry(r["patient_id"]).inputs[r["metric"]] = news2.Input(
            r["value"], r["ts_ms"], f"{r['device_type']}/{r['device_id']}")
    for r in _latest_observations(q, patient_id):
        e = entry(r["patient_id"])
        if r["kind"] == "spo2_scale":
            result[r["patient_id"]] = PatientInputs(e.hospital_id, e.inputs, int(json.loads(r["value"])))
        else:
            e.inputs[r["kind"]] = _observation_input(r["kind"], r["value"], r["ts_ms"], r["recorded_by"])
    return result


def _reading_row(r: sqlite3.Row) -> dict[str, Any]:
    return {"id": r["id"], "patient_id": r["patient_id"], "hospital_id": r["hospital_id"],
            "device_type": r["device_type"], "device_id": r["device_id"], "seq": r["seq"], "ts_ms": r["ts_ms"],
            "received_ms": r["received_ms"], "metrics": json.loads(r["metrics"]), "ts": format_ts(r["ts_ms"])}
