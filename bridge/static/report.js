// The alarm-fatigue report page: GET /api/reports/alarms with the dashboard's token (kept in
// this tab's sessionStorage by the ward page, or given as #token=...). No framework, no build.

const $ = (sel) => document.querySelector(sel);
const DAY_MS = 86_400_000;

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function seconds(value) {
  if (value === null || value === undefined) return '–';
  return value < 120 ? `${value.toFixed(1)} s` : `${(value / 60).toFixed(1)} min`;
}

function percent(rate) {
  return rate === null || rate === undefined ? '–' : `${(rate * 100).toFixed(1)} %`;
}

function token() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const fromHash = hash.get('token');
  if (fromHash) {
    sessionStorage.setItem('fc.token', fromHash);
    history.replaceState(null, '', location.pathname);
  }
  return sessionStorage.getItem('fc.token');
}

function showError(message) {
  const el = $('#r-error');
  el.textContent = message;
  el.hidden = !message;
}

function render(report) {
  const scope = report.hospital_id ? `ward ${report.hospital_id}` : 'all wards you may see';
  $('#r-scope').textContent = `${scope}, ${new Date(report.since).toLocaleString()} – ${new Date(report.until).toLocaleString()}: `
    + `${report.patient_days} monitored patient-days (a patient with at least one reading on a UTC day)`;
  const t = report.total;
  const totals = [
    ['Alarms', String(t.alarms)],
    ['Per patient-day', t.per_patient_day === null ? '–' : t.per_patient_day.toFixed(2)],
    ['Time to acknowledge, median', seconds(t.time_to_acknowledge_s.median)],
    ['Time to acknowledge, p90', seconds(t.time_to_acknowledge_s.p90)],
    ['Escalation rate', percent(t.escalation_rate)],
    [`Nuisance candidates (≤ ${report.nuisance_seconds} s)`, `${t.nuisance_candidates} (${percent(t.nuisance_rate)})`],
  ];
  $('#r-totals').replaceChildren(...totals.map(([k, v]) => {
    const pair = document.createElement('div');
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    pair.append(dt, dd);
    return pair;
  }));
  $('#r-rules').replaceChildren(...report.by_rule.map((r) => {
    const tr = document.createElement('tr');
    tr.dataset.rule = r.rule_id;
    tr.append(cell(r.rule_id), cell(r.priority, `prio prio-${r.priority}`), cell(String(r.alarms)),
      cell(r.per_patient_day === null ? '–' : r.per_patient_day.toFixed(2)),
      cell(seconds(r.time_to_acknowledge_s.median)), cell(seconds(r.time_to_acknowledge_s.p90)),
      cell(`${r.escalated} (${percent(r.escalation_rate)})`),
      cell(`${r.nuisance_candidates} (${percent(r.nuisance_rate)})`));
    return tr;
  }));
  if (!report.by_rule.length) {
    const tr = document.createElement('tr');
    const td = cell('No alarms in this window.');
    td.colSpan = 8;
    tr.append(td);
    $('#r-rules').replaceChildren(tr);
  }
  $('#r-examples').replaceChildren(...report.nuisance_examples.map((e) => {
    const tr = document.createElement('tr');
    tr.append(cell(new Date(e.raised_at).toLocaleString()), cell(e.rule_id), cell(e.priority, `prio prio-${e.priority}`),
      cell(e.patient_id || e.device || '–'), cell(seconds(e.lasted_s)));
    return tr;
  }));
}

async function load() {
  const jwt = token();
  if (!jwt) {
    showError('Sign in on the ward page first (or open this page with #token=...).');
    return;
  }
  const days = Number($('#r-window').value);
  const until = Date.now();
  const params = new URLSearchParams({since: String(until - days * DAY_MS), until: String(until),
    nuisance_seconds: $('#r-nuisance').value || '60'});
  const hospital = $('#r-hospital').value.trim();
  if (hospital) params.set('hospital_id', hospital);
  try {
    const response = await fetch(`/api/reports/alarms?${params}`, {headers: {Authorization: `Bearer ${jwt}`}});
    const body = await response.json();
    if (!response.ok) {
      showError(`${response.status} ${body.error}: ${body.detail}`);
      return;
    }
    showError('');
    render(body);
    window.__fcReport = body;
  } catch (err) {
    showError(`Could not load the report: ${err}`);
  }
}

$('#r-hospital').value = sessionStorage.getItem('fc.hospital') || '';
$('#report-form').addEventListener('submit', (event) => {
  event.preventDefault();
  load();
});
load();
