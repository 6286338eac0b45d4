/*
 * The Mix-of-Show fusion tab's submit, as the host's Checkpoint Merger does it: a task id, so the
 * host's progress bar (requestProgress, polling /internal/progress) shows above the tab's results,
 * and, once the job ends, the top checkpoint dropdown refreshed so the new file is in it at once.
 * Host page contract used: gradioApp, randomId, requestProgress, and the checkpoint list's refresh
 * button: A1111's quicksettings #refresh_sd_model_checkpoint (absent when the checkpoint is not in
 * quicksettings), Forge's #forge_refresh_checkpoint.
 */

// The `_js` of the tab's Fuse button: gradio passes the inputs, the first being a placeholder.
// eslint-disable-next-line no-unused-vars
function mosFusionSubmit() {
    const id = randomId();
    requestProgress(id, gradioApp().getElementById("mos_fusion_results_panel"), null, function() {
        const refresh = gradioApp().getElementById("refresh_sd_model_checkpoint") ||
            gradioApp().getElementById("forge_refresh_checkpoint");
        if (refresh) {
            refresh.click();
        }
    });
    const args = Array.from(arguments);
    args[0] = id;
    return args;
}

// The concept table follows the file selection. The host runs events concurrently, so the table
// for an earlier selection can come back after the newest one's; each request carries this page's
// id and a count, and the server answers a superseded one with no change.
const mosFusionPage = Math.random().toString(36).slice(2);
let mosFusionTableCount = 0;

// eslint-disable-next-line no-unused-vars
function mosFusionTableStamp(files, table) {
    mosFusionTableCount += 1;
    return [files, table, `${mosFusionPage}:${mosFusionTableCount}`];
}
