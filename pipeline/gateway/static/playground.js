"use strict";
const $ = (id) => document.getElementById(id);
let messages = [];          // the conversation so far, in OpenAI's chat format
let picture = null;         // data: URL of the chosen picture, sent with the next user turn
let pictureBytes = null;    // its bytes: once sent, later turns name it tuwen://images/<sha256> instead

function say(role, text, cls) {
  const div = document.createElement("div");
  div.className = "turn " + (cls || role);
  div.textContent = text;
  $("chat").appendChild(div);
  return div;
}

function headers() {
  return { "Authorization": "Bearer " + $("key").value.trim(), "Content-Type": "application/json" };
}

async function loadModels() {
  if (!$("key").value.trim()) return;
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) { $("status").textContent = "models: " + res.status; return; }
  const body = await res.json();
  $("model").innerHTML = "";
  for (const m of body.data) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = m.id;
    $("model").appendChild(opt);
  }
  $("status").textContent = body.data.length ? body.data.length + " model(s) live" : "no live worker";
}

// The key of a picture the gateway stored: the sha256 of its bytes. Sending the key instead of the
// bytes keeps follow-ups small (crypto.subtle exists on https:// and localhost pages only).
async function storedUrl(bytes) {
  if (!window.crypto || !crypto.subtle) return null;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return "tuwen://images/" + Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

$("key").addEventListener("change", loadModels);
$("picture").addEventListener("change", () => {
  const file = $("picture").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { picture = reader.result; $("preview").src = picture; $("preview").style.display = "block"; };
  reader.readAsDataURL(file);
  file.arrayBuffer().then((bytes) => { pictureBytes = bytes; });
});
$("reset").addEventListener("click", () => { messages = []; $("chat").innerHTML = ""; });

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  if (!$("model").value) await loadModels();
  const content = [];
  if (picture) content.push({ type: "image_url", image_url: { url: picture } });
  content.push({ type: "text", text: question });
  const turn = { role: "user", content };
  say("user", question + (picture ? "  [+ picture]" : ""));
  $("question").value = "";
  $("send").disabled = true;
  const out = say("assistant", "");
  const started = performance.now();
  let first = null, answer = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      // No max tokens given: the server's default (what is left of the context, up to its cap).
      body: JSON.stringify({ model: $("model").value || "tuwen", messages: [...messages, turn], stream: true,
                             max_tokens: parseInt($("max").value, 10) || undefined }),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error((body.error && (body.error.code + ": " + body.error.message)) || res.statusText);
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
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now() - started;
          answer += delta.content;
          out.textContent = answer;
        }
      }
    }
    if (picture && pictureBytes) {
      const stored = await storedUrl(pictureBytes);
      if (stored) turn.content[0] = { type: "image_url", image_url: { url: stored } };
    }
    messages.push(turn, { role: "assistant", content: answer });
    picture = null;
    pictureBytes = null;
    $("status").textContent = "job " + job + " · first token " + Math.round(first || 0) + " ms · whole answer " +
      Math.round(performance.now() - started) + " ms";
  } catch (err) {
    out.className = "turn error";
    out.textContent = String(err.message || err);
  } finally {
    $("send").disabled = false;
  }
});
