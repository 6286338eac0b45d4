// Double of the host's root script.js plus the javascript/ui.js functions extensions call
// (A1111 v1.10.1). Loaded first, as a classic script, so everything here is a global.

/* exported gradioApp, get_uiCurrentTab, get_uiCurrentTabContent, onUiUpdate, onAfterUiUpdate,
   onUiLoaded, onUiTabChange, onOptionsChanged, onOptionsAvailable, executeCallbacks, updateInput,
   switch_to_txt2img, recalculate_prompts_txt2img, recalculate_prompts_img2img, uiElementIsVisible,
   uiElementInSight, opts */

// The root gradio renders into: the shadow root of <gradio-app> when it has one, else the element
// (with getElementById answering from the document), else the document itself.
function gradioApp() {
    const app = document.querySelector("gradio-app");
    if (!app) {
        return document;
    }
    if (app.shadowRoot) {
        return app.shadowRoot;
    }
    app.getElementById = (id) => document.getElementById(id);
    return app;
}

// The selected button of the top-level tab bar (#tabs), or null.
function get_uiCurrentTab() {
    return gradioApp().querySelector("#tabs > .tab-nav > button.selected");
}

// The first top-level tab panel that is not hidden, or null.
function get_uiCurrentTabContent() {
    return gradioApp().querySelector('#tabs > .tabitem[id^=tab_]:not([style*="display: none"])');
}

var uiUpdateCallbacks = [];
var uiAfterUpdateCallbacks = [];
var uiLoadedCallbacks = [];
var uiTabChangeCallbacks = [];
var optionsChangedCallbacks = [];
var optionsAvailableCallbacks = [];
var uiAfterUpdateTimeout = null;
var uiCurrentTab = null;
var executedOnLoaded = false;

// The settings the host mirrors from its Settings tab; the double has none, so it stays empty and
// onOptionsAvailable / onOptionsChanged callbacks never run.
var opts = {};

// Each of these queues a callback. onUiUpdate callbacks get the MutationRecords of every DOM change
// under gradioApp(); onAfterUiUpdate callbacks run once DOM changes have paused for 200 ms;
// onUiLoaded callbacks run once, at the first DOM change after #txt2img_prompt exists; onUiTabChange
// callbacks run when the selected top-level tab button changes.
function onUiUpdate(callback) {
    uiUpdateCallbacks.push(callback);
}

function onAfterUiUpdate(callback) {
    uiAfterUpdateCallbacks.push(callback);
}

function onUiLoaded(callback) {
    uiLoadedCallbacks.push(callback);
}

function onUiTabChange(callback) {
    uiTabChangeCallbacks.push(callback);
}

function onOptionsChanged(callback) {
    optionsChangedCallbacks.push(callback);
}

function onOptionsAvailable(callback) {
    if (Object.keys(opts).length > 0) {
        callback();
    } else {
        optionsAvailableCallbacks.push(callback);
    }
}

// Runs every callback of the queue with `arg`; one that throws is logged and the rest still run.
function executeCallbacks(queue, arg) {
    queue.forEach((callback) => {
        try {
            callback(arg);
        } catch (error) {
            console.error("error running callback", callback, ":", error);
        }
    });
}

function scheduleAfterUiUpdateCallbacks() {
    if (uiAfterUpdateTimeout !== null) {
        clearTimeout(uiAfterUpdateTimeout);
    }
    uiAfterUpdateTimeout = setTimeout(() => {
        uiAfterUpdateTimeout = null;
        executeCallbacks(uiAfterUpdateCallbacks);
    }, 200);
}

document.addEventListener("DOMContentLoaded", () => {
    const observer = new MutationObserver((records) => {
        if (!executedOnLoaded && gradioApp().querySelector("#txt2img_prompt")) {
            executedOnLoaded = true;
            executeCallbacks(uiLoadedCallbacks);
        }
        executeCallbacks(uiUpdateCallbacks, records);
        scheduleAfterUiUpdateCallbacks();
        const tab = get_uiCurrentTab();
        if (tab && tab !== uiCurrentTab) {
            uiCurrentTab = tab;
            executeCallbacks(uiTabChangeCallbacks);
        }
    });
    observer.observe(gradioApp(), {childList: true, subtree: true});
});

// True when neither the element nor any ancestor up to the document is display: none.
function uiElementIsVisible(el) {
    for (let node = el; node && node !== document; node = node.parentNode) {
        if (node.nodeType === Node.ELEMENT_NODE && getComputedStyle(node).display === "none") {
            return false;
        }
    }
    return true;
}

// True when some of the element's box lies within the window's height.
function uiElementInSight(el) {
    const rect = el.getBoundingClientRect();
    return rect.bottom > 0 && rect.top < window.innerHeight;
}

// Tells gradio an input's value was set from javascript: a bubbling "input" event whose target is
// the element itself.
function updateInput(target) {
    const event = new Event("input", {bubbles: true});
    Object.defineProperty(event, "target", {value: target});
    target.dispatchEvent(event);
}

// Called by gradio (`_js`) after a paste into txt2img: selects the first top-level tab and passes
// its arguments through.
function switch_to_txt2img() {
    gradioApp().querySelector("#tabs").querySelectorAll("button")[0].click();
    return Array.from(arguments);
}

// The host recounts prompt tokens here; the double has no token counters.
function recalculate_prompts_txt2img() {
    return Array.from(arguments);
}

function recalculate_prompts_img2img() {
    return Array.from(arguments);
}
