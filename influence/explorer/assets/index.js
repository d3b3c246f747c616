// The explorer's index: every query as a card, filtered, sorted and paged here in the browser, so that
// tens of thousands of queries stay fast (only one page of cards is in the document at a time). Names
// come from users' files: they are set as text (textContent), never parsed as markup.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const controls = {
    label: document.getElementById("class"),
    correct: document.getElementById("correct"),
    minScore: document.getElementById("min-score"),
    sort: document.getElementById("sort"),
  };
  const grid = document.getElementById("queries");
  const status = document.getElementById("status");
  const previous = document.getElementById("previous-page");
  const next = document.getElementById("next-page");
  let page = 0;

  function chosen() {
    const label = controls.label.value === "" ? null : Number(controls.label.value);
    const correct = controls.correct.value;
    const minScore = controls.minScore.value === "" ? null : Number(controls.minScore.value);
    const shown = data.queries.filter(function (q) {
      if (label !== null && q.l !== label) return false;
      if (correct === "right" && q.c !== true) return false;
      if (correct === "wrong" && q.c !== false) return false;
      if (minScore !== null && (q.h === null || q.h < minScore)) return false;
      return true;
    });
    const key = controls.sort.value;
    if (key === "helpful") shown.sort(function (a, b) { return (b.h ?? -Infinity) - (a.h ?? -Infinity); });
    if (key === "harmful") shown.sort(function (a, b) { return (a.x ?? Infinity) - (b.x ?? Infinity); });
    return shown;
  }

  function line(parent, text, className) {
    const div = document.createElement("div");
    div.textContent = text;
    if (className) div.className = className;
    parent.appendChild(div);
    return div;
  }

  function card(q) {
    const figure = document.createElement("figure");
    figure.className = "card";
    figure.dataset.query = String(q.i);
    figure.dataset.label = data.labels[q.l];
    const link = document.createElement("a");
    link.href = "queries/" + q.i + ".html";
    const image = document.createElement("img");
    image.src = "thumbs/query/" + q.i + ".jpg";
    image.alt = "query " + q.i;
    link.appendChild(image);
    figure.appendChild(link);
    const caption = document.createElement("figcaption");
    line(caption, "query " + q.i).style.fontWeight = "bold";
    line(caption, data.labels[q.l], "label");
    if (q.p !== null && q.p !== undefined) {
      const prediction = line(caption, "pred. " + q.p, "prediction");
      if (q.c !== null && q.c !== undefined) {
        const verdict = document.createElement("span");
        verdict.className = q.c ? "right" : "wrong";
        verdict.textContent = q.c ? " right" : " wrong";
        prediction.appendChild(verdict);
      }
    }
    if (q.h !== null) line(caption, "top helpful " + q.h.toPrecision(4) + ", harmful " + q.x.toPrecision(4));
    figure.appendChild(caption);
    return figure;
  }

  function render() {
    const shown = chosen();
    const pages = Math.max(1, Math.ceil(shown.length / data.perPage));
    page = Math.min(Math.max(page, 0), pages - 1);
    grid.replaceChildren.apply(grid, shown.slice(page * data.perPage, (page + 1) * data.perPage).map(card));
    status.textContent = shown.length + " of " + data.queries.length + " queries, page " + (page + 1) + " of " + pages;
    previous.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  for (const control of Object.values(controls)) {
    for (const event of ["input", "change"]) {  // a <select> changed by script or driver may send only "change"
      control.addEventListener(event, function () { page = 0; render(); });
    }
  }
  previous.addEventListener("click", function () { page -= 1; render(); });
  next.addEventListener("click", function () { page += 1; render(); });
  render();
})();
