/*
 * Mix-of-Show region canvas: the panel around the drawing surface, added to RegionCanvas
 * (mix_of_show_regions_canvas.js, loaded before this file) as methods:
 * - `build`: the toolbar (tools, brush size, undo/redo, "+ Region", feather, the spec's "Global
 *   prompt inside regions", reference and mask files), the surface, the region list and status line;
 * - the region list: one entry per region with its prompt, negative, LoRAs (the picker of
 *   mix_of_show_loras.js, window.MixOfShowLoras) and own global prompt weight, its shape and problem;
 *   typing there edits the region record and rewrites the JSON (no undo entry);
 * - `status`: the line under the canvas.
 */
(function() {
    "use strict";

    const MOS = window.MixOfShow = window.MixOfShow || {};
    const {el, hexToInt} = MOS.util;
    const {MAX_REGIONS, PASS_UNET_WEIGHT, promptLoraNames} = MOS.regions;

    const PASSES_HINT = "Each region with LoRAs is drawn in a UNet pass of its own, so its LoRA cannot reach the other "
        + "regions (one more pass per such region: slower). Best for several concepts: on our toy world it placed two "
        + "concepts right in 100 % of pictures and three in 94 %, against 72 % and 59 % in one pass.";
    const PASS_UNET_HINT = "With separate passes: the share of each region LoRA's weight its UNet layers get in its "
        + "pass (its prompt's text encoding and cross-attention keep the full weight). 0.25 placed concepts best "
        + "on our toy world; raise it towards 1 (the LoRA at its full weight) when a concept comes out faint.";
    const GLOBAL_HINT = "0 = inside a region only its prompt counts (the main prompt applies outside the regions); "
        + "0.3 keeps 30 % of the main prompt there. A region's own value overrides it.";

    /** WCAG relative luminance of '#rrggbb'. */
    function luminance(color) {
        const v = hexToInt(color);
        const channel = c => {
            const s = c / 255;
            return s <= 0.04045 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
        };
        return 0.2126 * channel(v >> 16) + 0.7152 * channel((v >> 8) & 255) + 0.0722 * channel(v & 255);
    }

    /** Black or white, whichever contrasts more with `color`: a region's number stays readable on any
     * colour (a fixed one fails somewhere: black on the palette's blue is 4:1, white on its yellow 1.1:1);
     * the better of the two is always at least 4.58:1, over WCAG AA's 4.5. */
    function textOn(color) {
        const l = luminance(color);
        return (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? "#000000" : "#ffffff";
    }

    /** A number in [0, 1] read from a number input: null when empty, NaN when it is no such number. */
    function readShare(input) {
        if (input.validity.badInput) return NaN;
        if (input.value.trim() === "") return null;
        const v = Number(input.value);
        return Number.isFinite(v) && v >= 0 && v <= 1 ? v : NaN;
    }

    /** What a share input stands for once left: empty is `empty`, out of [0, 1] is clamped, no number
     * at all is `current` (the JSON's). */
    function settledShare(input, current, empty) {
        if (input.validity.badInput) return current;
        if (input.value.trim() === "") return empty;
        const v = Number(input.value);
        return Number.isFinite(v) ? Math.min(Math.max(v, 0), 1) : current;
    }

    Object.assign(MOS.RegionCanvas.prototype, {
        renderList() {
            this.list.replaceChildren(...this.regions.map((r, i) => this.listEntry(r, i)));
            this.empty.hidden = this.regions.length > 0;
            this.addButton.disabled = this.regions.length >= MAX_REGIONS;
            this.undoButton.disabled = !this.undoStack.length;
            this.redoButton.disabled = !this.redoStack.length;
        },

        /** The spec's share of the main prompt inside regions: its input (unless typed there), and each
         * region's placeholder. */
        setGlobalWeight(value, typed) {
            this.globalWeight = value;
            if (!typed) {
                this.globalInput.value = String(value);
                this.globalInput.classList.toggle("mos-invalid", !(value >= 0 && value <= 1)); // as pasted
            }
            for (const input of this.list.querySelectorAll(".mos-region-global")) input.placeholder = this.globalPlaceholder();
        },

        /** Whether each region with LoRAs gets a UNet pass of its own, and its LoRAs' UNet share
         * there (unchanged when not given): the checkbox and the number follow. */
        setPasses(value, unetWeight) {
            this.passes = value === true;
            this.passesInput.checked = this.passes;
            if (unetWeight !== undefined) this.passUnetWeight = unetWeight;
            this.passUnetInput.value = String(this.passUnetWeight);
            this.passUnetInput.classList.remove("mos-invalid");
            this.passUnetInput.disabled = !this.passes;
        },

        globalPlaceholder() {
            return `${this.globalWeight}`;
        },

        /** A region's LoRAs and its own global prompt weight (empty: the spec's). */
        regionExtras(r, i, problem) {
            const label = `Region ${i + 1}`;
            const changed = () => {
                problem.textContent = this.problem(r);
                this.write();
            };
            const global = el("input", {type: "number", class: "mos-region-global", min: "0", max: "1", step: "0.05",
                value: r.globalWeight === null ? "" : String(r.globalWeight), placeholder: this.globalPlaceholder(),
                "aria-label": `${label} global prompt weight (empty: the value for all regions)`,
                oninput: e => {
                    const v = readShare(e.target);
                    e.target.classList.toggle("mos-invalid", Number.isNaN(v));
                    if (Number.isNaN(v) || v === r.globalWeight) return; // the JSON keeps the last valid value
                    r.globalWeight = v;
                    changed();
                },
                onchange: e => {
                    const v = settledShare(e.target, r.globalWeight, null);
                    e.target.value = v === null ? "" : String(v);
                    e.target.classList.remove("mos-invalid");
                    if (v === r.globalWeight) return;
                    r.globalWeight = v;
                    changed();
                }});
            const globalLabel = el("label", {class: "mos-region-global-label",
                title: "Share of the main prompt kept inside this region, 0 to 1; empty = the value for all regions "
                    + "(Global prompt inside regions)"}, [el("span", {text: "Global"}), global]);
            const loras = window.MixOfShowLoras;
            if (!loras) return el("div", {class: "mos-lora-bar"}, [globalLabel]); // the picker's file did not load
            return loras.editor({label, loras: r.loras, taken: () => new Set(promptLoraNames(r.prompt)),
                onchange: changed, extra: [globalLabel]});
        },

        listEntry(r, i) {
            const selected = i === this.selected;
            const problem = el("span", {class: "mos-problem", text: this.problem(r)});
            // multi-line boxes the width of the list: a region prompt is as long as a main prompt
            const input = (cls, field, placeholder, label, rows) => {
                const box = el("textarea", {
                    class: cls, rows: String(rows), placeholder, "aria-label": label, spellcheck: "false",
                    oninput: e => {
                        r[field] = e.target.value;
                        problem.textContent = this.problem(r);
                        this.write();
                    },
                });
                box.value = r[field];
                return box;
            };
            const kind = {box: "box", paint: "painted", none: "no shape"}[r.kind];
            const entry = el("li", {class: "mos-region", role: "option", "aria-selected": String(selected),
                "data-index": String(i)}, [
                el("button", {class: "mos-swatch", type: "button", text: String(i + 1),
                    style: `background:${r.color};color:${textOn(r.color)}`,
                    title: `Select region ${i + 1} (${kind})`, "aria-label": `Select region ${i + 1}, ${kind}`,
                    onclick: () => this.select(i)}),
                el("div", {class: "mos-fields"}, [
                    input("mos-prompt", "prompt", `Region ${i + 1} prompt, e.g. a photo of <cat1> <cat2>`, `Region ${i + 1} prompt`, 2),
                    input("mos-negative", "negative", "Negative prompt (optional)", `Region ${i + 1} negative prompt`, 1),
                    this.regionExtras(r, i, problem),
                    el("div", {class: "mos-meta"}, [
                        el("span", {class: "mos-kind", text: r.kind === "box" ? `box ${this.describeBox(r)}` : kind}),
                        problem,
                    ]),
                ]),
                el("button", {class: "mos-delete", type: "button", text: "✕", title: `Delete region ${i + 1} (Delete)`,
                    "aria-label": `Delete region ${i + 1}`, onclick: () => this.deleteRegion(i)}),
            ]);
            // typing in a region's fields selects it without redrawing the list (focus stays put)
            entry.addEventListener("focusin", e => {
                if (this.selected === i || !e.target.matches("input, textarea")) return;
                this.selected = i;
                this.rebuildOverlay();
                this.render();
                for (const li of this.list.children) li.setAttribute("aria-selected", String(li === entry));
            });
            return entry;
        },

        status(text, error) {
            this.statusLine.textContent = text;
            this.statusLine.classList.toggle("mos-error", !!error);
        },

        build() {
            const button = (text, title, onclick, extra) => el("button", {type: "button", class: "mos-button", text, title,
                onclick, ...extra});
            const file = (accept, onfile) => el("input", {type: "file", accept, hidden: true,
                onchange: e => {
                    const f = e.target.files && e.target.files[0];
                    e.target.value = "";
                    if (f) onfile(f);
                }});
            this.toolButtons = {
                box: button("▭ Box", "Draw, move and resize boxes (B)", () => this.setTool("box"), {"aria-pressed": "true"}),
                brush: button("✎ Brush", "Paint the selected region, or a new one (P)", () => this.setTool("brush"), {"aria-pressed": "false"}),
                eraser: button("⌫ Eraser", "Erase the selected region's paint (E)", () => this.setTool("eraser"), {"aria-pressed": "false"}),
            };
            this.brushInput = el("input", {type: "range", min: "2", max: "256", step: "2", value: String(this.brush),
                "aria-label": "Brush size in pixels", oninput: e => this.setBrush(Number(e.target.value))});
            this.brushLabel = el("span", {class: "mos-brush-size", text: `${this.brush} px`});
            this.undoButton = button("↶ Undo", "Undo the last stroke or box edit (Ctrl+Z)", () => this.undo());
            this.redoButton = button("↷ Redo", "Redo (Ctrl+Shift+Z)", () => this.redo());
            this.addButton = button("+ Region", "Add a region row, then draw or paint it", () => {
                this.pushUndo();
                if (this.addRegion("none")) this.afterChange(true);
            });
            this.featherInput = el("input", {type: "number", min: "0", max: "64", step: "0.5", value: "0",
                class: "mos-feather", "aria-label": "Feather: soft region edges, in latent pixels (0 = hard)",
                onchange: e => {
                    const v = Number(e.target.value);
                    this.feather = Number.isFinite(v) ? Math.min(Math.max(v, 0), 64) : 0;
                    e.target.value = String(this.feather);
                    this.write();
                }});
            this.globalInput = el("input", {type: "number", min: "0", max: "1", step: "0.05", value: "0",
                class: "mos-global-weight", "aria-label": "Global prompt inside regions: share of the main prompt kept "
                    + "inside every region, 0 to 1",
                oninput: e => {
                    const v = readShare(e.target);
                    e.target.classList.toggle("mos-invalid", Number.isNaN(v));
                    if (Number.isNaN(v) || (v || 0) === this.globalWeight) return;
                    this.setGlobalWeight(v || 0, true);
                    this.write();
                },
                onchange: e => {
                    const v = settledShare(e.target, this.globalWeight, 0);
                    const write = v !== this.globalWeight;
                    this.setGlobalWeight(v);
                    if (write) this.write();
                }});
            this.passesInput = el("input", {type: "checkbox", class: "mos-passes",
                "aria-label": "Region LoRAs in separate passes",
                onchange: e => {
                    this.setPasses(e.target.checked);
                    this.write();
                }});
            this.passUnetInput = el("input", {type: "number", min: "0", max: "1", step: "0.05",
                value: String(this.passUnetWeight), class: "mos-pass-unet-weight", disabled: "",
                "aria-label": "UNet weight of region LoRAs in their passes: share of each LoRA's weight, 0 to 1",
                oninput: e => {
                    const v = readShare(e.target);
                    const bad = v === null || Number.isNaN(v);
                    e.target.classList.toggle("mos-invalid", bad);
                    if (bad || v === this.passUnetWeight) return;
                    this.passUnetWeight = v;
                    this.write();
                },
                onchange: e => {
                    const v = settledShare(e.target, this.passUnetWeight, PASS_UNET_WEIGHT);
                    const write = v !== this.passUnetWeight;
                    this.setPasses(this.passes, v);
                    if (write) this.write();
                }});
            const refInput = file("image/*", f => this.uploadReference(f));
            const maskInput = file("image/png,image/*", f => this.uploadMask(f));
            refInput.classList.add("mos-reference-input");
            maskInput.classList.add("mos-mask-input");
            this.clearReference = button("✕ Reference", "Hide the reference image", () => {
                this.reference = null;
                this.clearReference.hidden = true;
                this.render();
            }, {hidden: true});
            this.sizeLabel = el("span", {class: "mos-size", text: `${this.size[0]}×${this.size[1]}`});
            const toolbar = el("div", {class: "mos-toolbar", role: "toolbar", "aria-label": "Region canvas tools"}, [
                el("div", {class: "mos-group"}, Object.values(this.toolButtons)),
                el("label", {class: "mos-group", title: "Brush size ([ and ])"}, [el("span", {text: "Size"}), this.brushInput, this.brushLabel]),
                el("div", {class: "mos-group"}, [this.undoButton, this.redoButton]),
                el("div", {class: "mos-group"}, [this.addButton]),
                el("label", {class: "mos-group", title: "Soften every region's edge (latent pixels)"}, [el("span", {text: "Feather"}), this.featherInput]),
                el("label", {class: "mos-group", title: GLOBAL_HINT}, [el("span", {text: "Global prompt inside regions"}), this.globalInput]),
                el("label", {class: "mos-group", title: PASSES_HINT}, [this.passesInput, el("span", {text: "Region LoRAs in separate passes"})]),
                el("label", {class: "mos-group", title: PASS_UNET_HINT}, [el("span", {text: "UNet weight in passes"}), this.passUnetInput]),
                el("div", {class: "mos-group"}, [
                    button("Reference…", "Show a sketch or pose image under the regions to trace", () => refInput.click()), this.clearReference,
                    button("Upload mask…", "Read a colour-coded mask: one painted region per colour", () => maskInput.click()),
                    button("Download mask", "Save every region as a colour-coded PNG", () => this.downloadMask()),
                    refInput, maskInput,
                ]),
                this.sizeLabel,
            ]);
            this.canvas = el("canvas", {class: "mos-surface", tabindex: "0", role: "application",
                "aria-label": "Region canvas. Drag to draw a box; drag a box to move it, its handles to resize. "
                    + "B box, P brush, E eraser, Delete removes the selected region, Ctrl+Z undoes, arrows move a box."});
            this.canvas.addEventListener("pointerdown", e => this.onPointerDown(e));
            this.canvas.addEventListener("pointermove", e => this.onPointerMove(e));
            this.canvas.addEventListener("pointerup", e => this.onPointerUp(e));
            this.canvas.addEventListener("pointercancel", e => this.onPointerUp(e));
            this.canvas.addEventListener("dragstart", e => e.preventDefault());
            this.stage = el("div", {class: "mos-stage"}, [this.canvas]);
            this.list = el("ol", {class: "mos-regions", role: "listbox", "aria-label": "Regions"});
            this.empty = el("p", {class: "mos-empty", text: "No regions: the main prompt is used everywhere. Drag on the canvas to draw one."});
            this.statusLine = el("div", {class: "mos-status", role: "status", "aria-live": "polite"});
            const hint = el("p", {class: "mos-global-hint", text: `Global prompt inside regions: ${GLOBAL_HINT}`});
            this.root.replaceChildren(toolbar, hint, el("div", {class: "mos-body"}, [this.stage, el("div", {class: "mos-side"}, [this.list, this.empty])]), this.statusLine);
            this.root.addEventListener("keydown", e => this.onKeyDown(e));
            new ResizeObserver(() => this.layout()).observe(this.stage);
            this.renderList();
        },
    });
})();
