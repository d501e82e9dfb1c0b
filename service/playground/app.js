// The GLIPv2 playground: send an image and a task to the /v1 API like any client, and draw the
// answer on a canvas. Plain browser JavaScript, no build step and no dependency, so the service
// ships it as it is and it works offline.
"use strict";

// Tableau 10: ten colours easy to tell apart, for boxes, masks and highlights alike.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const MASK_ALPHA = 0.45;

// Per task: the endpoint, what the text field holds (null: no text), an example, the request
// fields made from the text, and which of the numeric options the endpoint takes.
const TASKS = {
  "detect-classes": {
    endpoint: "detect", text: "Classes, comma-separated",
    example: "circle, square, triangle, diamond, star, hexagon",
    fields: text => ({classes: splitList(text, ",")}), threshold: true, maxDetections: true,
  },
  "detect-prompt": {
    endpoint: "detect", text: "Prompt: phrases separated by . , ; or new lines",
    example: "blue square. red hexagon",
    fields: text => ({prompt: text}), threshold: true, maxDetections: true,
  },
  segment: {
    endpoint: "segment", text: "Referring expressions, one per line",
    example: "the blue shapes",
    fields: text => ({expressions: splitList(text, "\n")}), threshold: true, maxDetections: false,
  },
  vqa: {
    endpoint: "vqa", text: "Question", example: "how many squares are there?",
    fields: text => ({question: text}), threshold: false, maxDetections: false,
  },
  caption: {
    endpoint: "caption", text: null, example: "",
    fields: () => ({}), threshold: false, maxDetections: false,
  },
};

const $ = id => document.getElementById(id);
const canvas = $("canvas");
const context = canvas.getContext("2d");
const taskText = Object.fromEntries(Object.entries(TASKS).map(([name, t]) => [name, t.example]));
let image = null;  // {base64, element}: the image as the API gets it, and as it is drawn
let shownTask = $("task").value;

function splitList(text, separator) {
  return text.split(separator).map(part => part.trim()).filter(Boolean);
}

// --- COCO RLE ------------------------------------------------------------------------------

// The run lengths of a COCO compressed RLE string (pycocotools' rleFrString): each run is a
// variable-length integer, 5 bits per character from '0' (48), 0x20 = more characters follow,
// 0x10 in the last one = negative; from the third run on, each is stored as its difference from
// the run two before it.
function rleRuns(counts) {
  const runs = [];
  for (let at = 0; at < counts.length;) {
    let value = 0;
    let shift = 0;
    let code;
    do {
      code = counts.charCodeAt(at++) - 48;
      value |= (code & 0x1f) << shift;
      shift += 5;
    } while (code & 0x20);
    if (code & 0x10) value |= -1 << shift;
    if (runs.length > 2) value += runs[runs.length - 2];
    runs.push(value);
  }
  return runs;
}

// A mask {size: [h, w], counts} -> h*w bytes (0/1) in column-major order, as COCO stores it:
// runs alternate 0s and 1s, starting with 0s.
function rleDecode({size: [height, width], counts}) {
  const mask = new Uint8Array(height * width);
  let at = 0;
  rleRuns(counts).forEach((length, index) => {
    if (index % 2) mask.fill(1, at, at + length);
    at += length;
  });
  return mask;
}

// --- from an answer to what is drawn -------------------------------------------------------

// An answer as items (a box, maybe a mask, a colour, a table row each) and the text whose
// grounded spans ([start, end) in code points, as the API counts) get their items' colours.
// Items of one class, phrase or expression share a colour, given in order of appearance.
function toView(task, request, answer) {
  const colours = new Map();
  const colourOf = key => {
    if (!colours.has(key)) colours.set(key, PALETTE[colours.size % PALETTE.length]);
    return colours.get(key);
  };
  const phrases = (list, text) => ({
    text,
    items: list.map(p => ({label: p.phrase, score: p.score, box: p.box, span: p.span,
                           colour: colourOf(p.span.join())})),
  });
  switch (task) {
    case "detect-classes":
      return {text: null,
              items: answer.detections.map(d => ({...d, colour: colourOf(d.label)}))};
    case "detect-prompt":
      return {text: request.prompt,
              items: answer.detections.map(d => ({...d, colour: colourOf(d.span.join())}))};
    case "segment": {
      // Shown as sent, one expression per line; an expression's segments share its colour.
      const items = [];
      let start = 0;
      for (const result of answer.results) {
        const span = [start, start + Array.from(result.expression).length];
        start = span[1] + 1;
        for (const segment of result.segments) {
          items.push({label: result.expression, ...segment, span,
                      colour: colourOf(result.expression)});
        }
      }
      return {text: answer.results.map(result => result.expression).join("\n"), items};
    }
    case "vqa": {
      const view = phrases(answer.grounding, request.question);
      for (const {box, score} of answer.answer_grounding) {
        view.items.push({label: `answer: ${answer.answer}`, score, box, answer: true,
                         colour: colourOf("answer")});
      }
      return view;
    }
    case "caption":
      return phrases(answer.phrases, answer.caption);
  }
}

// --- drawing -------------------------------------------------------------------------------

function rgb(hex) {
  return [1, 3, 5].map(at => parseInt(hex.slice(at, at + 2), 16));
}

function textColourOn(hex) {
  const [r, g, b] = rgb(hex);
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111" : "#fff";
}

// The image at its own size (boxes are in its pixels; CSS scales the canvas), then the masks,
// the boxes, and the labels over every box.
function draw(view) {
  canvas.width = image.pixels.width;
  canvas.height = image.pixels.height;
  context.drawImage(image.pixels, 0, 0);
  if (!view) return;
  const masked = view.items.filter(item => item.mask);
  if (masked.length) paintMasks(masked);
  // At least 2 px, so the pixel under each edge is wholly the box's colour.
  const line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 250));
  context.lineWidth = line;
  for (const {box: [x0, y0, x1, y1], colour} of view.items) {
    context.strokeStyle = colour;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  const size = Math.max(12, line * 5);
  context.font = `${size}px sans-serif`;
  context.textBaseline = "top";
  for (const {box: [x0, y0], label, score, colour} of view.items) {
    const text = `${label} ${score.toFixed(2)}`;
    const width = context.measureText(text).width + 6;
    const left = Math.max(0, Math.min(x0, canvas.width - width));  // inside the image
    const top = y0 >= size + 4 ? y0 - size - 4 : y0;  // above the box, inside at the image top
    context.fillStyle = colour;
    context.fillRect(left, top, width, size + 4);
    context.fillStyle = textColourOn(colour);
    context.fillText(text, left + 3, top + 2);
  }
}

function paintMasks(items) {
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (const {mask, colour} of items) {
    const [height, width] = mask.size;
    const [r, g, b] = rgb(colour);
    rleDecode(mask).forEach((on, index) => {
      if (!on) return;
      const y = index % height;  // column-major
      const at = (y * width + (index - y) / height) * 4;
      data[at] += (r - data[at]) * MASK_ALPHA;
      data[at + 1] += (g - data[at + 1]) * MASK_ALPHA;
      data[at + 2] += (b - data[at + 2]) * MASK_ALPHA;
    });
  }
  context.putImageData(pixels, 0, 0);
}

function fillTable(items) {
  $("detections").hidden = !items.length;
  $("detections").tBodies[0].replaceChildren(...items.map(({colour, label, score, box}) => {
    const row = document.createElement("tr");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = colour;
    const cells = [swatch, label, score.toFixed(3), box.map(v => v.toFixed(1)).join(", ")];
    row.replaceChildren(...cells.map(content => {
      const cell = document.createElement("td");
      cell.append(content);
      return cell;
    }));
    return row;
  }));
}

// The text with each grounded span marked in its item's colour (overlaps: the first wins).
function highlight(text, items) {
  const element = $("highlight");
  element.hidden = text === null;
  if (text === null) return;
  const chars = Array.from(text);
  const spans = new Map(items.filter(item => item.span)
    .map(({span, colour}) => [span.join(), {span, colour}]));
  const parts = [];
  let at = 0;
  const ordered = [...spans.values()].sort((a, b) => a.span[0] - b.span[0]);
  for (const {span: [start, end], colour} of ordered) {
    if (start < at) continue;
    parts.push(chars.slice(at, start).join(""), marked(chars.slice(start, end).join(""), colour));
    at = end;
  }
  parts.push(chars.slice(at).join(""));
  element.replaceChildren(...parts);
}

function marked(text, colour) {
  const mark = document.createElement("mark");
  mark.textContent = text;
  mark.style.borderColor = colour;
  mark.style.backgroundColor = `${colour}40`;
  return mark;
}

// VQA: the answer, in the colour of its boxes when it has some, then the runners-up.
function showAnswer(task, answer, items) {
  const element = $("answer");
  element.hidden = task !== "vqa";
  if (task !== "vqa") return;
  const boxed = items.find(item => item.answer);
  const others = answer.answers.slice(1).map(a => `${a.answer} (${a.score.toFixed(2)})`);
  element.replaceChildren(
    "Answer: ", boxed ? marked(answer.answer, boxed.colour) : answer.answer,
    ` (${answer.score.toFixed(2)})`, others.length ? `; then ${others.join(", ")}` : "");
}

// --- running a request ---------------------------------------------------------------------

function setStatus(status) {
  $("output").dataset.status = status;
  $("run").disabled = status === "running" || !image;
}

function clearResults() {
  $("error").hidden = true;
  for (const id of ["latency", "result-json"]) $(id).textContent = "";
  $("answer").hidden = $("highlight").hidden = true;
  fillTable([]);
  if (image) draw(null);
}

function fail(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setStatus("error");
}

async function run(event) {
  event.preventDefault();
  const task = $("task").value;
  const spec = TASKS[task];
  const request = {image: image.base64, ...spec.fields($("text").value)};
  if (spec.threshold && $("threshold").value !== "") {
    request.threshold = Number($("threshold").value);
  }
  if (spec.maxDetections && $("max-detections").value !== "") {
    request.max_detections = Number($("max-detections").value);
  }
  const headers = {"content-type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  clearResults();
  setStatus("running");
  const started = performance.now();
  let response, answer;
  try {
    response = await fetch(`v1/${spec.endpoint}`,
                           {method: "POST", headers, body: JSON.stringify(request)});
    answer = await response.json();
  } catch (error) {  // no answer, or one that is not JSON (a proxy's error page)
    fail(`request failed: ${response ? `HTTP ${response.status}: ` : ""}${error.message}`);
    return;
  }
  const ms = performance.now() - started;
  $("latency").textContent = `${ms.toFixed(0)} ms · HTTP ${response.status} · ` +
    `request ${response.headers.get("x-request-id")}`;
  $("result-json").textContent = JSON.stringify(answer, null, 2);
  if (!response.ok) {
    const {code, message, request_id: requestId} =
      answer.error ?? {code: `HTTP ${response.status}`, message: response.statusText};
    fail(`${code}: ${message}` + (requestId ? ` (request ${requestId})` : ""));
    return;
  }
  const view = toView(task, request, answer);
  draw(view);
  fillTable(view.items);
  highlight(view.text, view.items);
  showAnswer(task, answer, view.items);
  setStatus("done");
}

// --- choosing an image and a task ----------------------------------------------------------

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// A JPEG's bytes with its EXIF orientation set to 1 (as stored), where it has one; browsers
// rotate by that tag whatever a page asks, and no decoding option turns it off.
function withoutOrientation(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 4 || view.getUint16(0) !== 0xffd8) return bytes;
  let at = 2;
  while (at + 4 <= bytes.length && bytes[at] === 0xff) {
    const marker = bytes[at + 1];
    const length = view.getUint16(at + 2);
    if (marker === 0xda || marker === 0xd9) break;  // the scan starts: no more headers
    const tiff = at + 10;  // after "Exif\0\0"
    if (marker === 0xe1 && length >= 16 && view.getUint32(at + 4) === 0x45786966) {
      const little = view.getUint16(tiff) === 0x4949;
      const ifd = tiff + view.getUint32(tiff + 4, little);
      const entries = ifd + 2 <= bytes.length ? view.getUint16(ifd, little) : 0;
      for (let i = 0; i < entries && ifd + 14 + 12 * i <= bytes.length; i++) {
        const entry = ifd + 2 + 12 * i;
        if (view.getUint16(entry, little) === 0x0112) {
          const copy = bytes.slice();
          new DataView(copy.buffer).setUint16(entry + 8, 1, little);
          return copy;
        }
      }
    }
    at += 2 + length;
  }
  return bytes;
}

// The stored pixel grid, EXIF orientation not applied: the service answers in that grid (a
// photo a phone saved sideways is drawn sideways, with its boxes where they belong).
async function useImage(blob, name) {
  const dataUrl = await readAsDataUrl(blob);
  let pixels;
  try {
    const bytes = withoutOrientation(new Uint8Array(await blob.arrayBuffer()));
    pixels = await createImageBitmap(new Blob([bytes], {type: blob.type}));
  } catch {
    fail(`${name}: this browser cannot read the image`);
    return;
  }
  image = {base64: dataUrl.slice(dataUrl.indexOf(",") + 1), pixels};
  canvas.dataset.source = name;
  $("source-name").textContent = `showing ${name}`;
  clearResults();
  setStatus("idle");
}

async function useExample(name) {
  const response = await fetch(`playground/${name}`);
  await useImage(await response.blob(), name);
}

function showTask() {
  const spec = TASKS[shownTask];
  $("text-label").textContent = spec.text ?? "Text (none: the caption is generated)";
  $("text").value = taskText[shownTask];
  $("text").disabled = spec.text === null;
  $("threshold").disabled = !spec.threshold;
  $("max-detections").disabled = !spec.maxDetections;
}

$("image").addEventListener("change", event => {
  const [file] = event.target.files;
  if (file) useImage(file, file.name);
});
const drop = $("drop");
drop.addEventListener("dragover", event => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", event => {
  event.preventDefault();
  drop.classList.remove("over");
  const [file] = event.dataTransfer.files;
  if (file) useImage(file, file.name);
});
for (const button of document.querySelectorAll("[data-example]")) {
  button.addEventListener("click", () => useExample(button.dataset.example));
}
$("task").addEventListener("change", () => {
  taskText[shownTask] = $("text").value;  // kept for when that task is picked again
  shownTask = $("task").value;
  showTask();
});
$("form").addEventListener("submit", run);
showTask();
useExample(document.querySelector("[data-example]").dataset.example);
