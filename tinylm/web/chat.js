// The tinylm chat page's script (served at /chat.js so the page's CSP can forbid inline scripts).
"use strict";
const $ = (id) => document.getElementById(id);
// `conversation` changes on "New chat": a request started in an older conversation must not write
// its (aborted) answer into the new history when its `finally` runs after the reset.
// `images`: data URLs attached to the next message (sent as OpenAI image_url parts; vision models).
const state = { history: [], controller: null, model: null, conversation: 0, images: [] };

// ---------- safe Markdown: build DOM nodes, text only through textContent ----------
function el(tag, cls, text) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined) n.textContent = text;
  return n;
}
function inline(parent, text) {
  // `code`, **bold**, *italic*, [label](https://...) ; everything else is plain text.
  const re = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)|(\[[^\]\n]+\]\((https?:\/\/[^\s)]+)\))/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) parent.appendChild(el("code", null, m[1].slice(1, -1)));
    else if (m[2]) parent.appendChild(el("strong", null, m[2].slice(2, -2)));
    else if (m[3]) parent.appendChild(el("em", null, m[3].slice(1, -1)));
    else if (m[4]) {
      const a = el("a", null, m[4].slice(1, m[4].indexOf("](")));
      a.href = m[5]; a.target = "_blank"; a.rel = "noopener noreferrer nofollow";
      parent.appendChild(a);
    }
    last = re.lastIndex;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}
function renderMarkdown(target, src) {
  target.replaceChildren();
  const parts = src.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // fenced code block (first line = language)
      const nl = part.indexOf("\n");
      const pre = el("pre"); pre.appendChild(el("code", null, nl >= 0 ? part.slice(nl + 1) : part));
      target.appendChild(pre);
      return;
    }
    for (const block of part.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.replace(/^\n+|\n+$/g, "").split("\n");
      const h = /^(#{1,3})\s+(.*)$/.exec(lines[0]);
      if (h && lines.length === 1) { const n = el("h" + h[1].length); inline(n, h[2]); target.appendChild(n); continue; }
      if (lines.every((l) => /^\s*[-*+]\s+/.test(l)) || lines.every((l) => /^\s*\d+[.)]\s+/.test(l))) {
        const ordered = /^\s*\d/.test(lines[0]);
        const list = el(ordered ? "ol" : "ul");
        for (const l of lines) { const li = el("li"); inline(li, l.replace(/^\s*([-*+]|\d+[.)])\s+/, "")); list.appendChild(li); }
        target.appendChild(list);
        continue;
      }
      if (lines.every((l) => l.startsWith(">"))) {
        const q = el("blockquote"); inline(q, lines.map((l) => l.replace(/^>\s?/, "")).join("\n"));
        target.appendChild(q); continue;
      }
      const p = el("p"); inline(p, lines.join("\n")); target.appendChild(p);
    }
  });
}

// ---------- messages ----------
function addMessage(role, text, images) {
  const empty = $("empty"); if (empty) empty.remove();
  const msg = el("div", "msg " + role);
  msg.appendChild(el("div", "avatar", role === "user" ? "U" : "t"));
  const bubble = el("div", "bubble");
  for (const url of images || []) { const img = el("img"); img.src = url; img.alt = "attached image"; bubble.appendChild(img); }
  const think = el("details", "think"); think.hidden = true;
  think.appendChild(el("summary", null, "Thinking"));
  const reasoning = el("div", "reasoning"); think.appendChild(reasoning);
  const content = el("div", "content");
  bubble.append(think, content);
  const meta = el("div", "meta"); bubble.appendChild(meta);
  msg.appendChild(bubble);
  $("thread").appendChild(msg);
  if (role === "user") content.textContent = text; else renderMarkdown(content, text || "");
  scrollDown();
  return { msg, think, reasoning, content, meta };
}
function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function send() {
  if (state.controller) { state.controller.abort(); return; }
  const text = $("input").value.trim();
  if (!text && !state.images.length) return;
  $("input").value = ""; autosize();
  const images = state.images;
  state.images = []; showAttachments();
  addMessage("user", text, images);
  const parts = [{ type: "text", text }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))];
  state.history.push({ role: "user", content: images.length ? parts : text });
  const view = addMessage("assistant", "");
  view.content.classList.add("cursor");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { messages, stream: true, temperature: parseFloat($("temperature").value),
                 max_tokens: parseInt($("max-tokens").value, 10) || 512, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const conversation = state.conversation;
  const controller = new AbortController();
  state.controller = controller;
  $("send").textContent = "Stop"; $("send").classList.add("stop");
  let answer = "", thinking = "", finish = null, usage = null, pending = false;
  const paint = () => {
    pending = false;
    renderMarkdown(view.content, answer);
    if (thinking) { view.think.hidden = !$("show-thinking").checked; view.reasoning.textContent = thinking; }
    scrollDown();
  };
  try {
    const post = () => fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                        signal: controller.signal });
    let resp = await post();
    if (resp.status === 400) {  // prompt + max tokens too long: let the server use the room that is left
      const err = await resp.clone().json().catch(() => ({}));
      if (err.error && err.error.code === "context_length_exceeded" && err.error.param === "max_tokens") {
        delete body.max_tokens;
        resp = await post();
      }
    }
    if (!resp.ok) {
      let msg = resp.status + " " + resp.statusText;
      try { msg = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();  // stream mode keeps split UTF-8 sequences intact
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let idx;
      while ((idx = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, idx); buf = buf.slice(idx + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) answer += c.delta.content;
            if (c.delta && c.delta.reasoning_content) thinking += c.delta.reasoning_content;
            if (c.finish_reason) finish = c.finish_reason;
          }
          if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else { const e = el("div", "error", "Error: " + err.message); view.content.after(e); }
  } finally {
    paint();
    view.content.classList.remove("cursor");
    const bits = [];
    if (finish) bits.push(finish === "length" ? "stopped: max tokens" : finish === "stopped" ? "stopped by you" : "done");
    if (usage) bits.push(usage.completion_tokens + " tokens");
    view.meta.textContent = bits.join(" · ");
    if (conversation === state.conversation) {
      if (answer) state.history.push({ role: "assistant", content: answer });
      else state.history.pop();
    }
    if (state.controller === controller) {
      state.controller = null;
      sendMode();
      $("input").focus();
    }
  }
}

// ---------- image attachments (file input -> data URL; the server never fetches URLs) ----------
function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result); r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}
function showAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.images.forEach((url, i) => {
    const chip = el("span", "thumb"); const img = el("img"); img.src = url; img.alt = "image " + (i + 1);
    const remove = el("button", null, "\u00d7"); remove.type = "button"; remove.title = "Remove";
    remove.addEventListener("click", () => { state.images.splice(i, 1); showAttachments(); });
    chip.append(img, remove); box.appendChild(chip);
  });
  box.hidden = !state.images.length;
}
$("image-file").addEventListener("change", async () => {
  for (const f of $("image-file").files) state.images.push(await readDataURL(f));
  $("image-file").value = "";
  showAttachments();
});

function sendMode() { $("send").textContent = "Send"; $("send").classList.remove("stop"); }

function autosize() { const t = $("input"); t.style.height = "auto"; t.style.height = Math.min(t.scrollHeight, 200) + "px"; }

$("send").addEventListener("click", send);
$("input").addEventListener("input", autosize);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("show-thinking").addEventListener("change", () => {
  for (const d of document.querySelectorAll("details.think")) if (d.querySelector(".reasoning").textContent) d.hidden = !$("show-thinking").checked;
});
$("new-chat").addEventListener("click", () => {
  state.conversation += 1;
  if (state.controller) state.controller.abort();
  state.controller = null;
  sendMode();
  state.history = [];
  state.images = []; showAttachments();
  $("thread").replaceChildren();
  const empty = el("div", "empty"); empty.id = "empty";
  empty.append(el("h2", null, "Chat with your model"), el("div", null, "Answers stream as they are generated."));
  $("thread").appendChild(empty);
});
for (const id of ["system", "temperature", "max-tokens", "api-key"]) {  // remember settings
  const saved = localStorage.getItem("tinylm." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("tinylm." + id, $(id).value));
}
$("temperature-value").textContent = $("temperature").value;
fetch("/health").then((r) => r.json()).then((h) => {
  state.model = h.model;
  $("model").textContent = h.model + " · context " + h.context + " tokens";
  $("key-box").hidden = !h.auth;
}).catch(() => { $("model").textContent = "server unreachable"; });
$("input").focus();
