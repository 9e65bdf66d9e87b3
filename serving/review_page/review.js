
"use strict";
const CLASSES = %CLASSES%;
let shownClasses = [];   // the buttons now on the page: the current face's models' classes
const token = document.querySelector('meta[name="csrf-token"]').content;
let current = null;
let busy = false;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function percent(p) { return (100 * p).toFixed(0) + " %"; }

function modelCard(model) {
  const card = el("article", {class: "model", "data-model": model.name});
  card.append(el("h2", {}, model.name + " ", el("span", {class: "version"},
                 model.version === null ? "" : "v" + model.version)));
  const top = model.top3[0];
  if (model.saliency_url) {
    card.append(el("img", {src: model.saliency_url, width: 240, height: 240,
                           alt: model.name + " saliency for " + top.en}));
    card.append(el("p", {class: "caption"}, "where " + model.name + " saw " + top.en +
                   " / " + top.es));
  } else {
    card.append(el("div", {class: "nomap"}, "no saliency from this model"));
    card.append(el("p", {class: "caption"}, ""));
  }
  model.top3.forEach((entry, rank) => {
    const bar = el("div", {class: rank === 0 ? "bar top" : "bar",
                           title: entry.en + " / " + entry.es});
    const fill = el("div", {class: "fill"});
    fill.style.width = (100 * entry.probability).toFixed(1) + "%";
    bar.append(fill, el("div", {class: "label"},
               el("span", {}, entry.class_id + " " + entry.en + " / " + entry.es),
               el("span", {}, percent(entry.probability))));
    card.append(bar);
  });
  return card;
}

function render(state) {
  current = state.item;
  const c = state.counts;
  const counts = document.getElementById("counts");
  counts.replaceChildren(el("b", {id: "left"}, state.left), " left \u00b7 " + c.labeled +
      " labelled \u00b7 " + c.not_face + " not a face \u00b7 " + c.skipped + " skipped");
  document.getElementById("work").hidden = !current;
  document.getElementById("done").hidden = !!current;
  document.querySelectorAll("#classes button, #not_face, #skip").forEach(
      b => { b.disabled = !current; });
  document.getElementById("undo").disabled = !state.can_undo;
  if (!current) return;
  // FER-2013 models answer 7 classes, FER+ ones 8 (with contempt): the buttons follow.
  if (JSON.stringify(current.classes) !== JSON.stringify(shownClasses)) {
    buildClassButtons(current.classes);
  }
  document.getElementById("face").src = current.face_url;
  document.getElementById("face").dataset.item = current.id;
  document.getElementById("source").textContent = "#" + current.id + " \u00b7 " +
      current.source + " \u00b7 " + current.created_at;
  document.getElementById("reason").textContent = current.ensemble.reason || "";
  document.getElementById("models").replaceChildren(...current.models.map(modelCard));
}

async function call(method, url, body) {
  if (busy) return;
  busy = true;
  document.getElementById("message").textContent = "";
  try {
    const options = {method, headers: {}, credentials: "same-origin"};
    if (method === "POST") {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRF-Token"] = token;
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(url, options);
    const payload = await response.json();
    if (!response.ok) {
      document.getElementById("message").textContent = payload.error || response.statusText;
      if (response.status === 409 || response.status === 404) {
        busy = false;
        return call("GET", "/api/next");   // the page was stale: show what is pending now
      }
      return;
    }
    render(payload);
  } catch (error) {
    document.getElementById("message").textContent = "cannot reach fer-review: " + error;
  } finally {
    busy = false;
  }
}

function decide(action, classId) {
  if (!current) return;
  const body = {action};
  if (action === "label") body.class_id = classId;
  call("POST", "/api/items/" + current.id + "/decision", body);
}

function undo() { call("POST", "/api/undo", {}); }

function buildClassButtons(classes) {
  const box = document.getElementById("classes");
  box.replaceChildren();
  for (const c of classes) {
    const button = el("button", {"data-class": c.id, title: "key " + c.id},
                      el("span", {}, el("kbd", {}, c.id), c.en), el("span", {class: "es"}, c.es));
    button.addEventListener("click", () => decide("label", c.id));
    box.append(button);
  }
  shownClasses = classes;
}

function buildButtons() {
  buildClassButtons(CLASSES);
  document.getElementById("not_face").addEventListener("click", () => decide("not_face"));
  document.getElementById("skip").addEventListener("click", () => decide("skip"));
  document.getElementById("undo").addEventListener("click", undo);
}

document.addEventListener("keydown", event => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (/^[0-9]$/.test(event.key)) {
    if (Number(event.key) >= shownClasses.length) return;
    decide("label", Number(event.key));
  }
  else if (event.key === "n") { decide("not_face"); }
  else if (event.key === "s") { decide("skip"); }
  else if (event.key === "u" || event.key === "Backspace") { undo(); }
  else return;
  event.preventDefault();
});

buildButtons();
call("GET", "/api/next");
