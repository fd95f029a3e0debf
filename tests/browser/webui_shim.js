// Stands for the part of the WebUI's own script.js (A1111 1.10, Forge 2.x) that extension scripts rely on:
// gradioApp(), onUiLoaded() and onAfterUiUpdate().  The WebUI loads script.js first, then every extension's
// javascript/*.js; tests/browser/page.py puts this file and javascript/attention_toolkit.js in the page head in
// that order.  As in the WebUI, the "UI loaded" callbacks run once, when the txt2img prompt box exists, and the
// "after UI update" callbacks run (debounced) after DOM changes.
(function () {
    "use strict";
    var loaded = [];
    var afterUpdate = [];
    var loadedDone = false;
    var timer = null;

    window.gradioApp = function () {
        var apps = document.getElementsByTagName("gradio-app");
        var root = apps.length ? apps[0] : document;
        return root.shadowRoot ? root.shadowRoot : root;
    };
    window.onUiLoaded = function (cb) {
        loaded.push(cb);
    };
    window.onAfterUiUpdate = function (cb) {
        afterUpdate.push(cb);
    };

    function run(list) {
        list.forEach(function (cb) {
            try {
                cb();
            } catch (e) {
                console.error("callback failed", e);
            }
        });
    }

    // The WebUI's script.js starts on DOMContentLoaded; gradio 4 adds a Blocks' head to the page later, when the
    // app mounts, so start at once if the document is already parsed.
    function start() {
        new MutationObserver(function () {
            if (!loadedDone && window.gradioApp().querySelector("#txt2img_prompt")) {
                loadedDone = true;
                run(loaded);
            }
            clearTimeout(timer);
            timer = setTimeout(function () {
                run(afterUpdate);
            }, 200);
        }).observe(window.gradioApp(), { childList: true, subtree: true });
    }
    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start();
    }
})();
