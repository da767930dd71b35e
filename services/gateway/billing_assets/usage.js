// The finance page: charts and sortable tables from the report the gateway embedded.
// Money arrives as exact decimal strings; it is shown as sent, and parsed only to draw and sort.
"use strict";
const data = JSON.parse(document.getElementById("usage-data").textContent);

function fill(table, rows, keys) {
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const key of keys) {
      const td = document.createElement("td");
      const value = row[key];
      td.textContent = value === undefined ? "-" : String(value);
      if (key === "tokens" || key === "cost_usd") td.className = "n";
      td.dataset.key = key;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function sortable(table, rows, keys) {
  let current = null, ascending = true;
  for (const th of table.querySelectorAll("th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key, numeric = th.dataset.num === "1";
      ascending = current === key ? !ascending : true;
      current = key;
      rows.sort((a, b) => {
        const x = numeric ? Number(a[key]) : String(a[key] ?? "");
        const y = numeric ? Number(b[key]) : String(b[key] ?? "");
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
      });
      table.dataset.sort = key + (ascending ? ":asc" : ":desc");
      fill(table, rows, keys);
    });
  }
  fill(table, rows, keys);
}

function chart(canvasId, field) {
  const days = [...new Set(data.daily.map((r) => r.bucket_start.slice(0, 10)))].sort();
  const series = new Map();
  for (const r of data.daily) {
    const name = r.tenant + " / " + r.base_model;
    if (!series.has(name)) series.set(name, new Map());
    const day = r.bucket_start.slice(0, 10);
    series.get(name).set(day, (series.get(name).get(day) || 0) + Number(r[field]));
  }
  const datasets = [...series].map(([label, values]) => ({
    label, data: days.map((d) => values.get(d) || 0),
  }));
  return new Chart(document.getElementById(canvasId), {
    type: "bar",
    data: { labels: days, datasets },
    options: { animation: false, responsive: true, scales: { x: { stacked: true }, y: { stacked: true } } },
  });
}

document.getElementById("total-cost").textContent = data.total_cost_usd;
document.getElementById("total-tokens").textContent = String(data.total_tokens);
sortable(document.getElementById("usage-table"), data.table,
         ["tenant", "base_model", "meter", "tokens", "cost_usd"]);
sortable(document.getElementById("runs-table"), data.runs, ["tenant", "run_id", "tokens", "cost_usd"]);
const charts = [chart("cost-chart", "cost_usd"), chart("tokens-chart", "tokens")];
document.body.dataset.rendered = String(charts.filter((c) => c.data.labels.length > 0).length);
