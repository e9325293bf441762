// The portal's live parts: each element with data-live follows a server-sent event
// stream and updates the text of its [data-field] cells (textContent only: what the
// server sends is shown as text, never parsed as HTML).
"use strict";

function setField(row, name, value) {
  const cells = row.querySelectorAll('[data-field="' + name + '"]');
  for (const cell of cells) {
    if (value !== undefined && cell.textContent !== String(value)) {
      cell.textContent = String(value);
    }
  }
}

function updateRows(root, key, items, fields) {
  let missing = false;
  for (const item of items) {
    const row = root.querySelector("[" + key + '="' + item.id + '"]');
    if (!row) { missing = true; continue; }
    row.dataset.status = item.status;
    for (const field of fields) { setField(row, field, item[field]); }
    for (const section of row.querySelectorAll("[data-show]")) {
      section.hidden = section.dataset.show !== item.status;
    }
  }
  return missing;
}

const ENDPOINT_FIELDS = ["status", "last_seen", "host", "version", "managers", "workers", "queued", "running"];
const TASK_FIELDS = ["status", "finished", "duration", "attempts", "error_code", "result", "traceback"];

function follow(root) {
  const source = new EventSource(root.dataset.live);
  source.addEventListener("endpoints", (event) => {
    const items = JSON.parse(event.data);
    const missing = updateRows(root, "data-endpoint-id", items, ENDPOINT_FIELDS);
    const count = root.dataset.count;
    if (missing || (count !== undefined && Number(count) !== items.length)) {
      window.location.reload();  // an endpoint came or went: draw the list again
    }
    root.dataset.updated = String(Date.now());
  });
  source.addEventListener("tasks", (event) => {
    updateRows(root, "data-task-id", JSON.parse(event.data), TASK_FIELDS);
    root.dataset.updated = String(Date.now());
  });
  source.addEventListener("signedout", () => {
    source.close();
    window.location.assign("/portal/signin");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const root of document.querySelectorAll("[data-live]")) { follow(root); }
});
