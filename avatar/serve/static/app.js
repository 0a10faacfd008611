// The page of `avatar serve`: uploads, jobs, the avatar list with its 3D viewer, videos.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { avatars: [], shownVideos: new Set(), viewer: null, viewerFor: null, recording: null };

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function request(url, options = {}) {
  // the server answers POSTs only with this header (a cross-site form cannot send it)
  const headers = { ...(options.headers || {}), ...(options.method === "POST" ? { "X-Avatar": "1" } : {}) };
  const response = await fetch(url, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

async function upload(fileOrBlob, name) {
  const url = `/api/upload?name=${encodeURIComponent(name || fileOrBlob.name || "upload")}`;
  return (await request(url, { method: "POST", body: fileOrBlob })).upload;
}

function submit(job) {
  return request("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(job) });
}

$("create").addEventListener("click", async () => {
  showMessage("");
  const file = $("photo").files[0];
  if (!file) return showMessage("Choose a photo first.");
  try {
    const photo = await upload(file);
    await submit({ kind: "create", photo, name: file.name, quality: $("quality").value });
    refresh();
  } catch (e) { showMessage(e.message); }
});

$("record").addEventListener("click", async () => {
  if (state.recording) { state.recording.stop(); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const recorder = new MediaRecorder(stream);
    const parts = [];
    recorder.ondataavailable = (e) => parts.push(e.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      state.recorded = new Blob(parts, { type: recorder.mimeType });
      state.recording = null;
      $("record").textContent = "● Record";
      $("recorded").textContent = `recorded ${(state.recorded.size / 1024).toFixed(0)} KB (used when no file is chosen)`;
    };
    recorder.start();
    state.recording = recorder;
    $("record").textContent = "■ Stop";
  } catch (e) { showMessage(`The microphone is not available: ${e.message}`); }
});

$("drive").addEventListener("click", async () => {
  showMessage("");
  const avatar = $("drive-avatar").value;
  if (!avatar) return showMessage("Create an avatar first.");
  const file = $("audio").files[0];
  if (!file && !state.recorded) return showMessage("Choose a speech file or record one.");
  try {
    const audio = file ? await upload(file) : await upload(state.recorded, "recording.webm");
    const job = { kind: "drive", avatar, audio, framing: $("framing").value,
                  view: $("view").value, size: Number($("size").value) };
    const partnerFile = $("partner").files[0];
    if (partnerFile) {
      job.kind = "converse";
      job.partner = await upload(partnerFile);
      const second = $("second-avatar").value;
      job.avatars = second ? [avatar, second] : [avatar];
    }
    await submit(job);
    refresh();
  } catch (e) { showMessage(e.message); }
});

function renderJobs(jobs) {
  const list = $("jobs");
  list.replaceChildren(...jobs.map((job) => {
    const item = document.createElement("li");
    item.dataset.status = job.status;
    item.id = `job-${job.id}`;
    const title = document.createElement("div");
    title.textContent = `${job.title}: ${job.status}` + (job.status === "running" ? ` (${job.stage}${job.eta ? `, ETA ${job.eta}` : ""})` : "")
      + (job.status === "done" ? ` in ${job.seconds} s` : "");
    item.append(title);
    if (job.status === "running") {
      const bar = document.createElement("progress");
      bar.max = 100; bar.value = job.percent;
      item.append(bar);
    }
    if (job.status === "running" || job.status === "queued") {
      const cancel = document.createElement("button");
      cancel.textContent = "cancel"; cancel.className = "cancel";
      cancel.onclick = () => request(`/api/jobs/${job.id}/cancel`, { method: "POST" })
        .then(refresh).catch((e) => showMessage(e.message));
      item.append(cancel);
    }
    if (job.error) {
      const error = document.createElement("div");
      error.className = "error";
      error.textContent = job.error;
      item.append(error);
    }
    return item;
  }));
  for (const job of jobs) {
    if (job.status === "done" && job.outputs.video && !state.shownVideos.has(job.id)) {
      state.shownVideos.add(job.id);
      const box = document.createElement("div");
      box.className = "video";
      const title = document.createElement("div");
      title.textContent = job.title;
      box.append(title);
      const video = document.createElement("video");
      video.controls = true; video.src = job.outputs.video; video.id = `video-${job.id}`;
      const link = document.createElement("a");
      link.href = `${job.outputs.video}?download`; link.textContent = "download MP4";
      box.append(video, link);
      $("videos").prepend(box);
    }
  }
}

function link(href, text) {
  const a = document.createElement("a");
  a.href = `${href}?download`; a.textContent = text;
  return a;
}

async function showViewer(avatar, container) {
  if (state.viewer) { state.viewer.dispose(); state.viewer = null; }
  document.querySelectorAll(".viewer").forEach((v) => v.replaceChildren());
  try {
    state.viewer = await window.AvatarViewer.mount(container, avatar.splat, {
      target: avatar.target, position: avatar.position, up: [0, 1, 0], background: "#ffffff", fov: 40 });
    state.viewerFor = avatar.id;
  } catch (e) { showMessage(`The 3D viewer could not show ${avatar.name}: ${e.message}`); }
}

function renderAvatars(avatars) {
  if (avatars.length === state.avatars.length) return;
  const fresh = avatars.filter((a) => !state.avatars.some((b) => b.id === a.id));
  state.avatars = avatars;
  $("no-avatars").hidden = avatars.length > 0;
  for (const select of [$("drive-avatar"), $("second-avatar")]) {
    const keep = select.value;
    select.replaceChildren(...(select.id === "second-avatar" ? [new Option("none: one avatar listens", "")] : []),
      ...avatars.map((a) => new Option(`${a.name} (#${a.id})`, a.id)));
    if (keep && avatars.some((a) => a.id === keep)) select.value = keep;
  }
  for (const avatar of [...fresh].reverse()) {  // oldest first, so the newest ends on top
    const box = document.createElement("div");
    box.className = "avatar"; box.id = `avatar-${avatar.id}`;
    const name = document.createElement("strong");
    name.textContent = `${avatar.name} (#${avatar.id})`;
    const viewer = document.createElement("div");
    viewer.className = "viewer";
    const look = document.createElement("button");
    look.textContent = "3D view"; look.addEventListener("click", () => showViewer(avatar, viewer));
    const turntable = document.createElement("video");
    turntable.src = avatar.turntable; turntable.loop = true; turntable.muted = true; turntable.autoplay = true;
    const downloads = document.createElement("div");
    downloads.className = "downloads";
    downloads.append(link(avatar.avatar, "avatar .zip"), link(avatar.splat, ".splat"),
                     link(avatar.ply, "PLY"), link(avatar.glb, "GLB (mesh + skeleton)"));
    box.append(name, viewer, look, turntable, downloads);
    $("avatars").prepend(box);
  }
  if (fresh.length) {
    $("drive-avatar").value = fresh[0].id;
    showViewer(fresh[0], document.querySelector(`#avatar-${fresh[0].id} .viewer`));
  }
}

async function refresh() {
  try {
    const [jobs, avatars] = await Promise.all([request("/api/jobs"), request("/api/avatars")]);
    renderAvatars(avatars);
    renderJobs(jobs);
  } catch (e) { showMessage(`The server does not answer: ${e.message}`); }
}

refresh();
setInterval(refresh, 1000);
