// Double of the host's root script.js plus the javascript/ui.js and javascript/progressbar.js
// functions extensions call (A1111 v1.10.1). Loaded first, as a classic script, so everything here is
// a global.

/* exported gradioApp, get_uiCurrentTab, get_uiCurrentTabContent, onUiUpdate, onAfterUiUpdate,
   onUiLoaded, onUiTabChange, onOptionsChanged, onOptionsAvailable, executeCallbacks, updateInput,
   switch_to_txt2img, recalculate_prompts_txt2img, recalculate_prompts_img2img, uiElementIsVisible,
   uiElementInSight, opts, randomId, requestProgress, create_submit_args, showSubmitButtons,
   showSubmitInterruptingPlaceholder, rememberGallerySelection, getGallerySelectedIndex, formatTime */

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

// The settings (javascript/ui.js): filled from the hidden #settings_json textbox at the first
// after-update pause that finds it, then onOptionsAvailable and onOptionsChanged callbacks run; a
// later change of that textbox's value reloads them and runs onOptionsChanged callbacks again.
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

onAfterUiUpdate(() => {
    if (Object.keys(opts).length !== 0) {
        return;
    }
    const holder = gradioApp().getElementById("settings_json");
    if (holder == null) {
        return;
    }
    const textarea = holder.querySelector("textarea");
    opts = JSON.parse(textarea.value);
    executeCallbacks(optionsAvailableCallbacks);
    executeCallbacks(optionsChangedCallbacks);

    const native = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value");
    Object.defineProperty(textarea, "value", {
        set(newValue) {
            const oldValue = native.get.call(textarea);
            native.set.call(textarea, newValue);
            if (oldValue != newValue) {
                opts = JSON.parse(textarea.value);
            }
            executeCallbacks(optionsChangedCallbacks);
        },
        get() {
            return native.get.call(textarea);
        },
    });
});

// Keyboard shortcuts of the host's script.js, on every keydown of the page: Ctrl+Enter clicks the
// current tab's Generate (after Interrupt when that is shown), Alt+Enter its Skip, Esc its Interrupt
// when shown. As in the host each keydown looks the three buttons up in the current tab, and these
// keys read them without checking: in a tab with no such buttons (an extension's tab) Esc, Ctrl+Enter
// and Alt+Enter throw a TypeError.
document.addEventListener("keydown", (e) => {
    const isEnter = e.key === "Enter" || e.keyCode === 13;
    const isCtrlKey = e.metaKey || e.ctrlKey;
    const isAltKey = e.altKey;
    const isEsc = e.key === "Escape";

    const generateButton = get_uiCurrentTabContent().querySelector("button[id$=_generate]");
    const interruptButton = get_uiCurrentTabContent().querySelector("button[id$=_interrupt]");
    const skipButton = get_uiCurrentTabContent().querySelector("button[id$=_skip]");

    if (isCtrlKey && isEnter) {
        if (interruptButton.style.display === "block") {
            interruptButton.click();
            const observer = new MutationObserver((mutations) => {
                for (const mutation of mutations) {
                    if (mutation.type === "attributes" && mutation.attributeName === "style" &&
                        interruptButton.style.display === "none") {
                        generateButton.click();
                        observer.disconnect();
                    }
                }
            });
            observer.observe(interruptButton, {attributes: true});
        } else {
            generateButton.click();
        }
        e.preventDefault();
    }

    if (isAltKey && isEnter) {
        skipButton.click();
        e.preventDefault();
    }

    if (isEsc) {
        const globalPopup = document.querySelector(".global-popup");
        const lightboxModal = document.querySelector("#lightboxModal");
        if (!globalPopup || globalPopup.style.display === "none") {
            if (document.activeElement === lightboxModal) {
                return;
            }
            if (interruptButton.style.display === "block") {
                interruptButton.click();
                e.preventDefault();
            }
        }
    }
});

// ---- javascript/ui.js: job submission helpers ----

// The args gradio hands a `_js` function, as an array; when the third from last is an array (a
// gallery sent back as an input) it is replaced by null so the images are not uploaded again.
function create_submit_args(args) {
    const res = Array.from(args);
    if (Array.isArray(res[res.length - 3])) {
        res[res.length - 3] = null;
    }
    return res;
}

// Shows or hides the generate box's buttons of `tabname` (txt2img, img2img) by their inline style.
function setSubmitButtonsVisibility(tabname, showInterrupt, showSkip, showInterrupting) {
    gradioApp().getElementById(tabname + "_interrupt").style.display = showInterrupt ? "block" : "none";
    gradioApp().getElementById(tabname + "_skip").style.display = showSkip ? "block" : "none";
    gradioApp().getElementById(tabname + "_interrupting").style.display = showInterrupting ? "block" : "none";
}

function showSubmitButtons(tabname, show) {
    setSubmitButtonsVisibility(tabname, !show, !show, false);
}

function showSubmitInterruptingPlaceholder(tabname) {
    setSubmitButtonsVisibility(tabname, false, true, true);
}

// ---- javascript/progressbar.js ----

function rememberGallerySelection() {
}

function getGallerySelectedIndex() {
}

// POSTs `data` as JSON to `url`; a 200 answer is parsed and given to `handler`; any other status, or
// an answer that does not parse (or a handler that throws, logged), calls `errorHandler`.
function request(url, data, handler, errorHandler) {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url, true);
    xhr.setRequestHeader("Content-Type", "application/json");
    xhr.onreadystatechange = () => {
        if (xhr.readyState !== 4) {
            return;
        }
        if (xhr.status !== 200) {
            errorHandler();
            return;
        }
        try {
            handler(JSON.parse(xhr.responseText));
        } catch (error) {
            console.error(error);
            errorHandler();
        }
    };
    xhr.send(JSON.stringify(data));
}

function pad2(x) {
    return x < 10 ? "0" + x : x;
}

// 75 -> "01:15", 3725 -> "01:02:05", 42.7 -> "42s".
function formatTime(secs) {
    if (secs > 3600) {
        return pad2(Math.floor(secs / 60 / 60)) + ":" + pad2(Math.floor(secs / 60) % 60) + ":" + pad2(Math.floor(secs) % 60);
    }
    if (secs > 60) {
        return pad2(Math.floor(secs / 60)) + ":" + pad2(Math.floor(secs) % 60);
    }
    return Math.floor(secs) + "s";
}

var originalAppTitle = undefined;

onUiLoaded(() => {
    originalAppTitle = document.title;
});

// "[<progress>] <title>" while a job runs, when opts.show_progress_in_title.
function setTitle(progress) {
    let title = originalAppTitle;
    if (opts.show_progress_in_title && progress) {
        title = "[" + progress.trim() + "] " + title;
    }
    if (document.title != title) {
        document.title = title;
    }
}

// A task id the server recognises: "task(" + 15 random base-36 characters + ")".
function randomId() {
    const part = () => Math.random().toString(36).slice(2, 7);
    return "task(" + part() + part() + part() + ")";
}

// Polls ./internal/progress for `id_task` and shows a bar, div.progressDiv > div.progress, inserted
// before `progressbarContainer` in its parent: its width is the progress, its text the textinfo (when
// on one line), the percentage and the ETA. The bar is removed and `atEnd` called once the task is
// completed, once it stops being active after it was, when it was never queued nor active after
// `inactivityTimeout` seconds, or when a request fails. `onProgress` gets each answer in between; the
// next request follows opts.live_preview_refresh_period ms later (500 without it). With a `gallery`,
// live previews are polled too and shown in a div.livePreview at its top.
function requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress, inactivityTimeout = 40) {
    const dateStart = new Date();
    let wasEverActive = false;
    const parentProgressbar = progressbarContainer.parentNode;
    let wakeLock = null;

    const requestWakeLock = async() => {
        if (!opts.prevent_screen_sleep_during_generation || wakeLock) return;
        try {
            wakeLock = await navigator.wakeLock.request("screen");
        } catch (err) {
            console.error("Wake Lock is not supported.");
        }
    };

    const releaseWakeLock = async() => {
        if (!opts.prevent_screen_sleep_during_generation || !wakeLock) return;
        try {
            await wakeLock.release();
            wakeLock = null;
        } catch (err) {
            console.error("Wake Lock release failed", err);
        }
    };

    let divProgress = document.createElement("div");
    divProgress.className = "progressDiv";
    divProgress.style.display = opts.show_progressbar ? "block" : "none";
    const divInner = document.createElement("div");
    divInner.className = "progress";
    divProgress.appendChild(divInner);
    parentProgressbar.insertBefore(divProgress, progressbarContainer);

    let livePreview = null;

    const removeProgressBar = () => {
        releaseWakeLock();
        if (!divProgress) return;
        setTitle("");
        parentProgressbar.removeChild(divProgress);
        if (gallery && livePreview) gallery.removeChild(livePreview);
        atEnd();
        divProgress = null;
    };

    const funProgress = (id_task) => {
        requestWakeLock();
        request("./internal/progress", {id_task: id_task, live_preview: false}, (res) => {
            if (res.completed) {
                removeProgressBar();
                return;
            }

            let progressText = "";
            divInner.style.width = ((res.progress || 0) * 100.0) + "%";
            divInner.style.background = res.progress ? "" : "transparent";
            if (res.progress > 0) {
                progressText = ((res.progress || 0) * 100.0).toFixed(0) + "%";
            }
            if (res.eta) {
                progressText += " ETA: " + formatTime(res.eta);
            }
            setTitle(progressText);
            if (res.textinfo && res.textinfo.indexOf("\n") == -1) {
                progressText = res.textinfo + " " + progressText;
            }
            divInner.textContent = progressText;

            const elapsedFromStart = (new Date() - dateStart) / 1000;
            if (res.active) wasEverActive = true;
            if (!res.active && wasEverActive) {
                removeProgressBar();
                return;
            }
            if (elapsedFromStart > inactivityTimeout && !res.queued && !res.active) {
                removeProgressBar();
                return;
            }
            if (onProgress) {
                onProgress(res);
            }
            setTimeout(() => {
                funProgress(id_task, res.id_live_preview);
            }, opts.live_preview_refresh_period || 500);
        }, removeProgressBar);
    };

    const funLivePreview = (id_task, id_live_preview) => {
        request("./internal/progress", {id_task: id_task, id_live_preview: id_live_preview}, (res) => {
            if (!divProgress) {
                return;
            }
            if (res.live_preview && gallery) {
                const img = new Image();
                img.onload = () => {
                    if (!livePreview) {
                        livePreview = document.createElement("div");
                        livePreview.className = "livePreview";
                        gallery.insertBefore(livePreview, gallery.firstElementChild);
                    }
                    livePreview.appendChild(img);
                    if (livePreview.childElementCount > 2) {
                        livePreview.removeChild(livePreview.firstElementChild);
                    }
                };
                img.src = res.live_preview;
            }
            setTimeout(() => {
                funLivePreview(id_task, res.id_live_preview);
            }, opts.live_preview_refresh_period || 500);
        }, removeProgressBar);
    };

    funProgress(id_task, 0);
    if (gallery) {
        funLivePreview(id_task, 0);
    }
}
