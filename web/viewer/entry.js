// Thin wrapper around Spark (@sparkjsdev/spark) + three.js, exposed as window.AvatarViewer.
//
//   const handle = await AvatarViewer.mount(div, "/files/avatar.splat", {
//     target: [0, 0.9, 0], position: [0, 1.2, 3], up: [0, 1, 0], background: "#ffffff",
//   });
//   ...
//   handle.dispose();
//
// World convention: +Y up, metres. Files (.splat antimatter15 / 3DGS .ply / .spz / .ksplat) are
// shown as stored, without the 180-degree flip that Spark's own examples apply to OpenCV scenes.
// Once the first frame containing the splat is drawn, canvas.dataset.ready = "1".
import * as THREE from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
import { SparkRenderer, SplatMesh, getSplatFileType } from "@sparkjsdev/spark";

const VERSION = "spark-2.2.0+three-0.180.0";
const FORMATS = ["splat", "ply", "spz", "ksplat"];

function vec3(value, fallback) {
  const v = value == null ? fallback : value;
  if (!Array.isArray(v) || v.length !== 3 || !v.every(Number.isFinite)) {
    throw new Error(`AvatarViewer: expected [x, y, z] numbers, got ${JSON.stringify(value)}`);
  }
  return new THREE.Vector3(v[0], v[1], v[2]);
}

function formatOf(url, bytes, explicit) {
  if (explicit) {
    const f = String(explicit).toLowerCase().replace(/^\./, "");
    if (!FORMATS.includes(f)) throw new Error(`AvatarViewer: unsupported format "${explicit}"`);
    return f;
  }
  const path = String(url).split(/[?#]/)[0].toLowerCase();
  const ext = path.includes(".") ? path.slice(path.lastIndexOf(".") + 1) : "";
  if (FORMATS.includes(ext)) return ext;
  const sniffed = getSplatFileType(bytes); // recognises ply / spz / ksplat by magic bytes
  return sniffed || "splat"; // .splat has no header
}

function nextFrame() {
  return new Promise((resolve) => requestAnimationFrame(() => resolve()));
}

// True when some sampled pixel of the (preserved) drawing buffer differs from the clear colour.
function hasContent(gl, clear) {
  const w = gl.drawingBufferWidth;
  const h = gl.drawingBufferHeight;
  if (!w || !h) return false;
  const px = new Uint8Array(w * h * 4);
  gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
  const step = 4 * 7; // every 7th pixel is plenty
  for (let i = 0; i < px.length; i += step) {
    if (
      Math.abs(px[i] - clear[0]) > 8 ||
      Math.abs(px[i + 1] - clear[1]) > 8 ||
      Math.abs(px[i + 2] - clear[2]) > 8
    ) {
      return true;
    }
  }
  return false;
}

/**
 * Mount a splat viewer in `container` and load `url`.
 * Options: target, position, up ([x,y,z]), background (CSS colour), fov (deg, default 40),
 * format ("splat" | "ply" | "spz" | "ksplat"; default from the URL extension / magic bytes),
 * readyTimeoutMs (default 30000: give up waiting for the first sorted frame and resolve anyway,
 * with timings.timedOut = true), fetchOptions (passed to fetch).
 * Resolves to a handle {canvas, renderer, scene, camera, controls, mesh, spark, numSplats, timings,
 * setView({target, position, up}), dispose()}; rejects with an Error when loading fails.
 */
async function mount(container, url, options = {}) {
  if (!(container instanceof Element)) throw new Error("AvatarViewer.mount: container must be a DOM element");
  const opts = { fov: 40, background: "#ffffff", readyTimeoutMs: 30000, ...options };
  const target = vec3(opts.target, [0, 0.9, 0]);
  const position = vec3(opts.position, [0, 0.9, 3.2]);
  const up = vec3(opts.up, [0, 1, 0]).normalize();
  const background = new THREE.Color(opts.background);

  const canvas = document.createElement("canvas");
  canvas.style.cssText = "display:block;width:100%;height:100%;outline:none;touch-action:none;";
  canvas.dataset.ready = "0";
  container.appendChild(canvas);

  let renderer = null;
  let disposed = false;
  let resizeObserver = null;
  let controls = null;
  let spark = null;
  let mesh = null;
  let loading = true; // render every frame until the first sorted frame is on screen
  let needsRender = true;

  const dispose = () => {
    if (disposed) return;
    disposed = true;
    if (renderer) renderer.setAnimationLoop(null);
    if (resizeObserver) resizeObserver.disconnect();
    if (controls) controls.dispose();
    if (mesh) mesh.dispose();
    if (spark && typeof spark.dispose === "function") spark.dispose();
    if (renderer) {
      renderer.dispose();
      renderer.forceContextLoss();
    }
    canvas.remove();
  };

  try {
    renderer = new THREE.WebGLRenderer({
      canvas,
      antialias: false,
      alpha: false,
      preserveDrawingBuffer: true,
      powerPreference: "high-performance",
    });
    renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    renderer.setClearColor(background, 1);

    const scene = new THREE.Scene();
    const camera = new THREE.PerspectiveCamera(opts.fov, 1, 0.01, 1000);
    spark = new SparkRenderer({ renderer });
    scene.add(spark);

    controls = new OrbitControls(camera, canvas);
    controls.enableDamping = true;
    controls.dampingFactor = 0.1;
    controls.screenSpacePanning = true;

    const setView = (view = {}) => {
      if (view.up) camera.up.copy(vec3(view.up).normalize());
      if (view.position) camera.position.copy(vec3(view.position));
      if (view.target) controls.target.copy(vec3(view.target));
      camera.lookAt(controls.target);
      controls.update();
      needsRender = true;
    };
    camera.up.copy(up);
    camera.position.copy(position);
    controls.target.copy(target);
    camera.lookAt(target);
    controls.update();

    const resize = () => {
      const w = Math.max(1, container.clientWidth || canvas.clientWidth || 1);
      const h = Math.max(1, container.clientHeight || canvas.clientHeight || 1);
      renderer.setSize(w, h, false);
      camera.aspect = w / h;
      camera.updateProjectionMatrix();
      needsRender = true;
    };
    resize();
    resizeObserver = new ResizeObserver(resize);
    resizeObserver.observe(container);

    // Render on demand: when the camera moves (incl. damping), on resize, while loading, and
    // when Spark reports new work (sort / LoD finished). Idle viewers then cost ~nothing,
    // which matters a lot under software WebGL (SwiftShader).
    controls.addEventListener("change", () => (needsRender = true));
    renderer.setAnimationLoop(() => {
      const moved = controls.update();
      if (loading || moved || needsRender || spark.dirty) {
        needsRender = false;
        renderer.render(scene, camera);
      }
    });

    const tStart = performance.now();
    const response = await fetch(url, opts.fetchOptions);
    if (!response.ok) {
      throw new Error(`AvatarViewer: HTTP ${response.status} ${response.statusText} loading ${url}`);
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    if (disposed) throw new Error("AvatarViewer: disposed while loading");
    if (bytes.length === 0) throw new Error(`AvatarViewer: ${url} is empty`);
    const tFetched = performance.now();
    const format = formatOf(url, bytes, opts.format);
    if (format === "splat" && bytes.length % 32 !== 0) {
      throw new Error(`AvatarViewer: ${url} is ${bytes.length} bytes, not a multiple of 32 (.splat)`);
    }
    mesh = new SplatMesh({ fileBytes: bytes, fileType: format, fileName: String(url) });
    await mesh.initialized;
    if (disposed) throw new Error("AvatarViewer: disposed while loading");
    scene.add(mesh);
    const tParsed = performance.now();

    // Wait until the splat is actually in the drawing buffer (sorting runs in a worker).
    const gl = renderer.getContext();
    const clear = background.clone().convertLinearToSRGB().toArray().map((c) => Math.round(c * 255));
    // Ready = Spark has sorted and drawn the splats (activeSplats > 0) and some pixel differs
    // from the background; or, when the camera looks away from them, 10 frames after that.
    const t0 = performance.now();
    let framesActive = 0;
    let timedOut = false;
    for (;;) {
      await nextFrame();
      if (disposed) throw new Error("AvatarViewer: disposed while loading");
      if (spark.activeSplats > 0) {
        framesActive += 1;
        if (framesActive >= 10 || hasContent(gl, clear)) break;
      }
      if (performance.now() - t0 > opts.readyTimeoutMs) {
        timedOut = true;
        break;
      }
    }
    loading = false;
    needsRender = true;
    canvas.dataset.ready = "1";
    const tReady = performance.now();
    const timings = {
      fetchMs: tFetched - tStart,
      parseMs: tParsed - tFetched,
      firstFrameMs: tReady - tParsed,
      totalMs: tReady - tStart,
      timedOut,
    };

    return {
      version: VERSION,
      canvas,
      renderer,
      scene,
      camera,
      controls,
      mesh,
      spark,
      format,
      numSplats: mesh.numSplats,
      timings,
      setView,
      dispose,
    };
  } catch (err) {
    dispose();
    throw err instanceof Error ? err : new Error(String(err));
  }
}

export { mount, VERSION as version, THREE };
