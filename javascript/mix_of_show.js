/*
 * Mix-of-Show region canvas for the txt2img script "Mix-of-Show": the shared namespace and start-up.
 *
 * The script's "Regions (JSON)" textbox stays the one source of truth (infotext, API and "Send to
 * txt2img" all go through it): every edit on the canvas rewrites that JSON, and any change to the
 * JSON that the canvas did not write itself (typing, pasting infotext, the API's UI state) is parsed
 * and redrawn. The JSON form is lib_mos/regional/regions.py's: boxes are [top, left, bottom, right] in "px"
 * or "fraction" units; painted regions name a colour of a colour-coded PNG `mask_image`.
 *
 * The canvas is spread over these files, which the host injects as classic scripts in alphabetical
 * order ('.' sorts before '_', so this one comes first) and which share `window.MixOfShow`:
 *   mix_of_show.js                 this file: the namespace, small DOM helpers (`util`), start-up
 *   mix_of_show_loras.js           the per-region LoRA picker (window.MixOfShowLoras)
 *   mix_of_show_png.js             `png`: indexed PNG encoding, reading images and uploaded masks
 *   mix_of_show_regions.js         `regions`, `RegionModel`: the spec JSON, region records, undo
 *   mix_of_show_regions_canvas.js  `RegionCanvas`: host textbox sync, drawing, pointer and keys
 *   mix_of_show_regions_panel.js   RegionCanvas' toolbar and region list (methods added to it)
 * A file uses at load time only what files before it define; anything at call time. Nothing is
 * built before the host's onUiLoaded, by which every file has loaded.
 *
 * The host's page contract used: gradioApp, onUiLoaded, onAfterUiUpdate, updateInput, and the
 * sliders #<tab>_width / #<tab>_height.
 */
(function() {
    "use strict";

    const MOS = window.MixOfShow = window.MixOfShow || {};

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function el(tag, props, children) {
        const node = document.createElement(tag);
        for (const [key, value] of Object.entries(props || {})) {
            if (key === "class") node.className = value;
            else if (key === "text") node.textContent = value;
            else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
            else if (key in node && typeof value !== "string") node[key] = value;
            else node.setAttribute(key, value);
        }
        for (const child of children || []) node.append(child);
        return node;
    }

    function hexToInt(color) {
        return parseInt(color.slice(1), 16);
    }

    function fireInput(target) {
        if (typeof updateInput === "function") {
            updateInput(target);
        } else {
            target.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    MOS.util = {app, el, hexToInt, fireInput};

    // ------------------------------------------------------------------------------ start-up

    const instances = new Map(); // the "Regions (JSON)" textbox's elem_id -> its RegionCanvas
    MOS.instances = instances;

    function scan() {
        for (const root of app().querySelectorAll(".mos-canvas")) {
            if (root.dataset.ready) continue;
            root.dataset.ready = "1";
            instances.set(root.dataset.regions, new MOS.RegionCanvas(root));
        }
    }

    // Slider drags and typing reach the canvas at once; anything else within a poll interval.
    document.addEventListener("input", () => instances.forEach(c => c.poll()), true);
    window.mixOfShowCanvas = instances; // for tests and for anyone debugging a page
    if (typeof onUiLoaded === "function") {
        onUiLoaded(scan);
        onAfterUiUpdate(scan);
    } else {
        document.addEventListener("DOMContentLoaded", scan);
    }
})();
