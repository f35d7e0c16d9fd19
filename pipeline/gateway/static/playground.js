"use strict";
const $ = (id) => document.getElementById(id);
let messages = [];          // the conversation so far, in OpenAI's chat format
let picture = null;         // data: URL of the chosen picture, sent with the next user turn
let pictureBytes = null;    // its bytes: once sent, later turns name it tuwen://images/<sha256> instead
let lastModels = null;      // the last /v1/models answer, to say it again in another language
let spoken = null;          // the spoken question (base64 WAV), sent as an input_audio part with the next user turn
let recorder = null;        // the MediaRecorder while recording

// Every label in both languages; Chinese first, English a click away (remembered for the browser session).
const TEXT = {
  zh: {
    tagline: "看图提问，用中文问；回答从队列中逐字流回", key: "API 密钥", model: "模型", picture: "图片",
    max: "最多生成的 token 数", maxPlaceholder: "服务器默认", reset: "新对话", send: "发送",
    question: "图中有几个圆形？（Enter 发送，Shift+Enter 换行）", noModels: "（填入密钥后载入模型）",
    schema: "JSON schema（可选：回答为符合它的 JSON 对象）", parsed: "解析后的 JSON", lang: "EN",
    audio: "语音提问（可选：录音或音频文件）", record: "● 录音", stop: "■ 停止", heard: (s) => `语音 ${s} 秒，待发送`,
    transcript: (text) => `听到：${text}`, spokenTurn: "（语音提问）",
    models: (n) => n ? `${n} 个模型在线` : "没有在线的 worker：请运行 tuwen worker",
    modelsFailed: (status) => `载入模型失败：${status}`,
    done: (job, first, whole) => `任务 ${job} · 首个 token ${first} ms · 完整回答 ${whole} ms`,
    badSchema: (why) => `JSON schema 不是有效的 JSON：${why}`,
    notWhole: (reason) => `回答不是完整的 JSON（finish_reason: ${reason}）`,
  },
  en: {
    tagline: "ask about a picture, in Chinese; the answer streams from the queue", key: "API key", model: "model",
    picture: "picture", max: "max tokens", maxPlaceholder: "the server's default", reset: "New conversation",
    send: "Send", question: "图中有几个圆形？ (Enter sends, Shift+Enter for a new line)",
    noModels: "(load models with the key)", parsed: "parsed JSON", lang: "中文",
    audio: "spoken question (optional: record, or an audio file)", record: "● Record", stop: "■ Stop",
    heard: (s) => `${s} s of speech, to send`, transcript: (text) => `heard: ${text}`, spokenTurn: "(spoken question)",
    schema: "JSON schema (optional: the answer is a JSON object valid against it)",
    models: (n) => n ? `${n} model${n > 1 ? "s" : ""} live` : "no live worker: start tuwen worker",
    modelsFailed: (status) => `loading the models failed: ${status}`,
    done: (job, first, whole) => `job ${job} · first token ${first} ms · whole answer ${whole} ms`,
    badSchema: (why) => `the JSON schema is not valid JSON: ${why}`,
    notWhole: (reason) => `the answer is not whole JSON (finish_reason: ${reason})`,
  },
};
let lang = sessionStorage.getItem("tuwen.lang") === "en" ? "en" : "zh";
const t = (name) => TEXT[lang][name];

function applyLanguage() {
  document.documentElement.lang = lang === "en" ? "en" : "zh-CN";
  for (const el of document.querySelectorAll("[data-text]")) el.textContent = t(el.dataset.text);
  for (const el of document.querySelectorAll("[data-placeholder]")) el.placeholder = t(el.dataset.placeholder);
  $("preview").alt = lang === "en" ? "the picture you chose" : "你选的图片";
  if (lastModels) showModelCount(lastModels);
}

function say(role, text, cls) {
  const div = document.createElement("div");
  div.className = "turn " + (cls || role);
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("chat").appendChild(div);
  div.scrollIntoView({ block: "nearest" });
  return div;
}

function headers() {
  return { "Authorization": "Bearer " + $("key").value.trim(), "Content-Type": "application/json" };
}

// Worker models are named checkpoint@digest:quantization; the others (tuwen, the configured aliases) are
// names of the same served model, so they are not counted.
function showModelCount(models) {
  $("status").textContent = t("models")(models.filter((m) => m.id.includes("@")).length);
}

async function loadModels() {
  if (!$("key").value.trim()) return;
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) { $("status").textContent = t("modelsFailed")(res.status); return; }
  const body = await res.json();
  $("model").innerHTML = "";
  for (const m of body.data) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = m.id;
    $("model").appendChild(opt);
  }
  lastModels = body.data;
  showModelCount(body.data);
}

// The key of a picture the gateway stored: the sha256 of its bytes. Sending the key instead of the
// bytes keeps follow-ups small (crypto.subtle exists on https:// and localhost pages only).
async function storedUrl(bytes) {
  if (!window.crypto || !crypto.subtle) return null;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return "tuwen://images/" + Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Any audio the browser decodes (a recording's WebM/Opus, an uploaded file) as 16-bit mono WAV, which the
// gateway reads whatever its rate (libsndfile); returns [base64, seconds].
async function asWav(blob) {
  const context = new AudioContext();
  const decoded = await context.decodeAudioData(await blob.arrayBuffer());
  context.close();
  const n = decoded.length, rate = decoded.sampleRate, channels = decoded.numberOfChannels;
  const mono = new Float32Array(n);
  for (let c = 0; c < channels; c++) {
    const data = decoded.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / channels;
  }
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) view.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 32767, true);
  const bytes = new Uint8Array(view.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 32768) binary += String.fromCharCode(...bytes.subarray(i, i + 32768));
  return [btoa(binary), (n / rate).toFixed(1)];
}

async function takeSpoken(blob) {
  const [data, seconds] = await asWav(blob);
  spoken = data;
  $("spoken").textContent = t("heard")(seconds);
}

function clearSpoken() {
  spoken = null;
  $("audio").value = "";
  $("spoken").textContent = "";
}

function clearPicture() {
  picture = null;
  pictureBytes = null;
  $("picture").value = "";
  $("preview").removeAttribute("src");
  $("preview").style.display = "none";
}

// The response_format of the schema box, or null when it is empty; throws on JSON that does not parse.
function responseFormat() {
  const text = $("schema").value.trim();
  if (!text) return null;
  let schema;
  try { schema = JSON.parse(text); } catch (err) { throw new Error(t("badSchema")(err.message)); }
  return { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
}

function showParsed(out, answer, finish) {
  const label = document.createElement("span");
  label.className = "parsed-label";
  const pre = document.createElement("pre");
  pre.className = "parsed";
  try {
    pre.textContent = JSON.stringify(JSON.parse(answer), null, 2);
    label.textContent = t("parsed");
  } catch (err) {
    pre.textContent = t("notWhole")(finish || "?");
    pre.classList.add("error");
  }
  out.append(label, pre);
}

$("lang").addEventListener("click", () => {
  lang = lang === "en" ? "zh" : "en";
  sessionStorage.setItem("tuwen.lang", lang);
  applyLanguage();
});
// The key stays for this browser session (a reload keeps it; closing the tab forgets it).
$("key").addEventListener("change", () => {
  sessionStorage.setItem("tuwen.key", $("key").value.trim());
  loadModels();
});
$("picture").addEventListener("change", () => {
  const file = $("picture").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { picture = reader.result; $("preview").src = picture; $("preview").style.display = "block"; };
  reader.readAsDataURL(file);
  file.arrayBuffer().then((bytes) => { pictureBytes = bytes; });
});
$("audio").addEventListener("change", () => {
  const file = $("audio").files[0];
  if (file) takeSpoken(file).catch((err) => { $("spoken").textContent = String(err.message || err); });
});
// Record from the microphone until Stop (the browser's MediaRecorder; its WebM is turned into WAV here).
$("record").addEventListener("click", async () => {
  if (recorder) { recorder.stop(); return; }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((track) => track.stop());
    recorder = null;
    $("record").textContent = t("record");
    await takeSpoken(new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" }));
  };
  recorder.start();
  $("record").textContent = t("stop");
});
$("reset").addEventListener("click", () => {
  messages = [];
  $("chat").innerHTML = "";
  clearPicture();
  clearSpoken();
  $("question").focus();
});
// Enter sends, Shift+Enter makes a new line; Enter that confirms an input method's candidate does neither.
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    if (!$("send").disabled) $("ask").requestSubmit();
  }
});

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question && !spoken) return;
  let format;
  try { format = responseFormat(); } catch (err) { $("status").textContent = err.message; return; }
  if (!$("model").value) await loadModels();
  const content = [];
  if (picture) content.push({ type: "image_url", image_url: { url: picture } });
  if (question) content.push({ type: "text", text: question });
  if (spoken) content.push({ type: "input_audio", input_audio: { data: spoken, format: "wav" } });
  const turn = { role: "user", content };
  const asked = say("user", question || t("spokenTurn"));
  if (picture) {
    const thumb = document.createElement("img");
    thumb.className = "thumb";
    thumb.src = picture;
    thumb.alt = $("preview").alt;
    asked.prepend(thumb);
  }
  $("question").value = "";
  $("send").disabled = true;
  const out = say("assistant", "");
  const text = out.querySelector(".text");
  const started = performance.now();
  let first = null, answer = "", finish = null;
  try {
    const body = { model: $("model").value || "tuwen", messages: [...messages, turn], stream: true,
                   // No max tokens given: the server's default (what is left of the context, up to its cap).
                   max_tokens: parseInt($("max").value, 10) || undefined };
    if (format) body.response_format = format;
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!res.ok) {
      const failed = await res.json().catch(() => ({}));
      throw new Error((failed.error && (failed.error.code + ": " + failed.error.message)) || res.statusText);
    }
    const job = res.headers.get("X-Tuwen-Job-Id");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.code + ": " + chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (choice && choice.delta && choice.delta.content) {
          if (first === null) first = performance.now() - started;
          answer += choice.delta.content;
          text.textContent = answer;
        }
      }
    }
    if (format) showParsed(out, answer, finish);
    if (picture && pictureBytes) {
      const stored = await storedUrl(pictureBytes);
      if (stored) turn.content[0] = { type: "image_url", image_url: { url: stored } };
    }
    if (spoken) {  // what the speech stage heard: shown, and the turn's text from now on (the audio is not sent again)
      const heard = await fetch("/v1/jobs/" + job, { headers: headers() }).then((r) => r.json());
      const line = document.createElement("span");
      line.className = "meta transcript";
      line.textContent = t("transcript")(heard.transcript || "");
      asked.append(document.createElement("br"), line);
      turn.content = turn.content.map((part) => part.type === "input_audio" ? { type: "text", text: heard.transcript || "" }
                                                                           : part);
    }
    messages.push(turn, { role: "assistant", content: answer });
    clearPicture();
    clearSpoken();
    $("status").textContent = t("done")(job, Math.round(first || 0), Math.round(performance.now() - started));
  } catch (err) {
    out.className = "turn error";
    text.textContent = String(err.message || err);
  } finally {
    $("send").disabled = false;
    out.scrollIntoView({ block: "nearest" });
  }
});

applyLanguage();
const savedKey = sessionStorage.getItem("tuwen.key");
if (savedKey) { $("key").value = savedKey; loadModels(); }
