/*
 * The Mix-of-Show training tab's submit, as the host's Train tab does it: a task id, so the host's
 * progress bar (requestProgress, polling /internal/progress) shows above the tab's results with the
 * step, loss and speed, and preview samples appear as live previews in the tab's gallery. The
 * gallery is hidden until a run returns samples; style.css shows it while a live preview is in it
 * (#mos_train_gallery.hidden:has(> .livePreview)), so nothing here touches gradio's visibility.
 * Interrupt is enabled and disabled by the tab's own events around the job (gradio updates).
 * When the job ends, the fusion tab's Refresh is clicked so the new concept is in its list at once.
 * Host page contract used: gradioApp, randomId, requestProgress; #mos_fusion_refresh is this
 * extension's fusion tab.
 */

// The `_js` of the tab's Train button: gradio passes the inputs, the first being a placeholder.
// eslint-disable-next-line no-unused-vars
function mosTrainSubmit() {
    const id = randomId();
    const app = gradioApp();
    requestProgress(id, app.getElementById("mos_train_results_panel"), app.getElementById("mos_train_gallery"),
        function() {
            const refresh = gradioApp().getElementById("mos_fusion_refresh");
            if (refresh) {
                refresh.click();
            }
        });
    const args = Array.from(arguments);
    args[0] = id;
    return args;
}
