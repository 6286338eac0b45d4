/*
 * Mix-of-Show region canvas: the per-region LoRA picker (used by the region list of
 * javascript/mix_of_show_regions_panel.js through `window.MixOfShowLoras`; the canvas only asks for it
 * when it draws its region list, after every script has loaded).
 *
 * The picker lists the Lora folder as the extension's route GET mix-of-show/loras reports it
 * ({"loras": [{"name", "path", "tokens"}]}, sorted by name), fetched afresh each time the list opens
 * so a file dropped into the folder shows up without a reload. The filter matches name and path
 * substrings, case-insensitive, as the host's extra-networks search does.
 *
 * `editor(options)` builds one region's LoRA bar: a chip per listed LoRA (name, weight, remove) and
 * the "+ LoRA" button that opens the searchable list. It edits the region's `loras` array in place
 * ({name, weight} objects, other keys kept) and calls `onchange` after every edit; the canvas then
 * rewrites the JSON. Names the folder lacks stay as they are, flagged "not in the Lora folder".
 */
(function() {
    "use strict";

    const ROUTE = "mix-of-show/loras"; // relative to the page: a --subpath install works too
    const WEIGHT_STEP = "0.05";

    let known = null; // Map name -> {name, path, tokens} of the last list fetched; null before any
    let pending = null; // the fetch in flight
    let attempted = false; // a background fetch for the "not in the Lora folder" flags was made

    const {app, el} = window.MixOfShow.util; // mix_of_show.js loads first (alphabetical order)

    // ------------------------------------------------------------------------- the folder's list

    async function fetchList() {
        let response;
        try {
            response = await fetch(ROUTE, {cache: "no-store", headers: {Accept: "application/json"}});
        } catch (e) {
            throw new Error("the WebUI did not answer");
        }
        if (!response.ok) throw new Error(`the WebUI answered ${response.status} ${response.statusText}`.trim());
        let data;
        try {
            data = await response.json();
        } catch (e) {
            throw new Error("the WebUI's answer is not JSON");
        }
        if (!data || !Array.isArray(data.loras)) throw new Error("the WebUI's answer has no LoRA list");
        const loras = data.loras.filter(e => e && typeof e.name === "string").map(e => ({
            name: e.name,
            path: typeof e.path === "string" ? e.path : "",
            tokens: Array.isArray(e.tokens) ? e.tokens.filter(t => typeof t === "string") : [],
        }));
        known = new Map(loras.map(e => [e.name, e]));
        refreshFlags();
        return loras;
    }

    /** The Lora folder's LoRAs, fetched now (one request at a time). */
    function list() {
        if (!pending) pending = fetchList().finally(() => { pending = null; });
        return pending;
    }

    /** Case-insensitive substring of the name or the path; an empty query matches everything. */
    function matches(entry, query) {
        const q = (query || "").trim().toLowerCase();
        return !q || entry.name.toLowerCase().includes(q) || (entry.path || "").toLowerCase().includes(q);
    }

    function missing(name) {
        return known !== null && !known.has(name);
    }

    /** Every chip on the page flagged (or not) after a new list came in. */
    function refreshFlags() {
        for (const chip of app().querySelectorAll(".mos-lora[data-name]")) setFlag(chip, missing(chip.dataset.name));
    }

    function setFlag(chip, isMissing) {
        chip.classList.toggle("mos-lora-missing", isMissing);
        const flag = chip.querySelector(".mos-lora-flag");
        if (flag) flag.hidden = !isMissing;
        const entry = known && known.get(chip.dataset.name);
        chip.title = isMissing ? `${chip.dataset.name}: not in the Lora folder (kept as written)`
            : entry ? `${entry.path}${entry.tokens.length ? ", tokens " + entry.tokens.join(" ") : ""}` : chip.dataset.name;
    }

    function weightText(weight) {
        return String(weight === undefined ? 1 : weight);
    }

    // --------------------------------------------------------------------- one region's LoRA bar

    /**
     * options: label ("Region 2"), loras (the region's array, edited in place), taken() (names also
     * given as <lora:...> tags in the region's prompt), onchange(), extra (nodes for the bar's end).
     */
    function editor(options) {
        const {label, loras, onchange} = options;
        const taken = options.taken || (() => new Set());
        let active = -1; // highlighted option
        let shown = []; // options listed now
        let openSeq = 0;

        const chips = el("ul", {class: "mos-lora-chips", "aria-label": `${label} LoRAs`});
        const addButton = el("button", {type: "button", class: "mos-button mos-lora-add", text: "+ LoRA",
            title: "Apply a LoRA inside this region only", "aria-label": `Add a LoRA to ${label.toLowerCase()}`,
            "aria-haspopup": "listbox", "aria-expanded": "false", onclick: () => (picker.hidden ? open() : close())});
        const search = el("input", {type: "search", class: "mos-lora-search", placeholder: "Search LoRAs by name or folder",
            "aria-label": `Search LoRAs for ${label.toLowerCase()}`, autocomplete: "off",
            oninput: () => { active = 0; renderOptions(); },
            onkeydown: e => onSearchKey(e)});
        const optionList = el("ul", {class: "mos-lora-options", role: "listbox", "aria-label": "LoRAs in the Lora folder"});
        const message = el("p", {class: "mos-lora-message", role: "status"});
        const picker = el("div", {class: "mos-lora-picker", hidden: true}, [search, message, optionList]);
        const root = el("div", {class: "mos-loras"}, [
            el("div", {class: "mos-lora-bar"}, [chips, addButton, ...(options.extra || [])]),
            picker,
        ]);

        function changed() {
            renderChips();
            onchange();
        }

        function renderChips() {
            chips.replaceChildren(...loras.map((lora, j) => chip(lora, j)));
            chips.hidden = !loras.length;
        }

        function chip(lora, j) {
            const weight = el("input", {type: "number", class: "mos-lora-weight", step: WEIGHT_STEP,
                value: weightText(lora.weight), "aria-label": `${label} LoRA ${lora.name} weight`,
                oninput: e => {
                    const v = e.target.value === "" ? NaN : Number(e.target.value);
                    const ok = Number.isFinite(v) && !e.target.validity.badInput;
                    e.target.classList.toggle("mos-invalid", !ok);
                    if (!ok || v === lora.weight) return; // the JSON keeps the last number
                    lora.weight = v;
                    onchange();
                },
                onchange: e => { // left with no number in it: show the weight the JSON has
                    if (e.target.classList.contains("mos-invalid")) {
                        e.target.value = weightText(lora.weight);
                        e.target.classList.remove("mos-invalid");
                    }
                }});
            const node = el("li", {class: "mos-lora", "data-name": lora.name}, [
                el("span", {class: "mos-lora-name", text: lora.name}),
                el("span", {class: "mos-lora-flag", text: "not in the Lora folder", hidden: true}),
                weight,
                el("button", {type: "button", class: "mos-lora-remove", text: "×", title: `Remove ${lora.name}`,
                    "aria-label": `Remove LoRA ${lora.name} from ${label.toLowerCase()}`,
                    onclick: () => {
                        loras.splice(j, 1);
                        changed();
                        addButton.focus();
                    }}),
            ]);
            setFlag(node, missing(lora.name));
            return node;
        }

        function used() {
            const names = new Set(taken());
            for (const lora of loras) names.add(lora.name);
            return names;
        }

        function pick(entry) {
            const names = used();
            if (names.has(entry.name)) return;
            loras.push({name: entry.name, weight: 1});
            close();
            changed();
            const input = chips.querySelector(".mos-lora:last-child .mos-lora-weight");
            if (input) input.focus();
        }

        function renderOptions() {
            if (!known) return;
            const names = used();
            const inPrompt = taken();
            const all = [...known.values()];
            shown = all.filter(entry => matches(entry, search.value));
            active = shown.length ? Math.min(Math.max(active, 0), shown.length - 1) : -1;
            optionList.replaceChildren(...shown.map((entry, k) => {
                const isTaken = names.has(entry.name);
                const note = !isTaken ? "" : inPrompt.has(entry.name) ? "in the prompt" : "added";
                return el("li", {class: "mos-lora-option" + (k === active ? " mos-active" : ""), role: "option",
                    "data-name": entry.name, "aria-selected": String(k === active), "aria-disabled": String(isTaken),
                    title: isTaken ? `${entry.name} is already ${note === "added" ? "in this region" : "a tag in its prompt"}` : `Add ${entry.name}`,
                    onmousedown: e => e.preventDefault(), // the search box keeps the focus
                    onclick: () => pick(entry)}, [
                    el("span", {class: "mos-lora-option-name", text: entry.name}),
                    el("span", {class: "mos-lora-option-path", text: entry.path}),
                    ...(entry.tokens.length ? [el("span", {class: "mos-lora-option-tokens", text: entry.tokens.join(" ")})] : []),
                    ...(note ? [el("span", {class: "mos-lora-option-note", text: note})] : []),
                ]);
            }));
            if (!all.length) say("No LoRA files in the Lora folder (models/Lora or --lora-dir). Put .safetensors files there, then open this list again.");
            else if (!shown.length) say(`No LoRA in the Lora folder matches “${search.value.trim()}”.`);
            else say("");
        }

        function say(text, error) {
            message.textContent = text;
            message.hidden = !text;
            message.classList.toggle("mos-error", !!error);
        }

        function open() {
            picker.hidden = false;
            addButton.setAttribute("aria-expanded", "true");
            document.addEventListener("pointerdown", outside, true);
            search.focus();
            const seq = ++openSeq;
            optionList.replaceChildren();
            say("Reading the Lora folder…");
            list().then(() => {
                if (seq !== openSeq || picker.hidden) return;
                active = 0;
                renderOptions();
            }, e => {
                if (seq !== openSeq || picker.hidden) return;
                say(`Could not read the LoRA list: ${e.message}. Close and open this list to try again.`, true);
            });
        }

        function close() {
            openSeq++;
            picker.hidden = true;
            addButton.setAttribute("aria-expanded", "false");
            document.removeEventListener("pointerdown", outside, true);
        }

        function outside(e) {
            const path = e.composedPath ? e.composedPath() : [];
            if (!root.isConnected || !(path.includes(root) || root.contains(e.target))) close();
        }

        function onSearchKey(e) {
            if (e.key === "ArrowDown" || e.key === "ArrowUp") {
                if (shown.length) {
                    active = (active + (e.key === "ArrowDown" ? 1 : -1) + shown.length) % shown.length;
                    renderOptions();
                    const node = optionList.children[active];
                    if (node && node.scrollIntoView) node.scrollIntoView({block: "nearest"});
                }
            } else if (e.key === "Enter") {
                if (active >= 0 && shown[active]) pick(shown[active]);
            } else if (e.key === "Escape") {
                close();
                addButton.focus();
            } else {
                return;
            }
            e.preventDefault();
            e.stopPropagation();
        }

        renderChips();
        if (loras.length && known === null && !attempted) { // flag names the folder lacks
            attempted = true;
            list().catch(() => {});
        }
        return root;
    }

    window.MixOfShowLoras = {editor, list, matches, route: ROUTE};
})();
