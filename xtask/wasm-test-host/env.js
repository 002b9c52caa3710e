// Stand-in for the proxy-wasm host in the wasm32 unit tests (`cargo xtask test`, step 5).
//
// A filter crate's test module links the proxy-wasm SDK, whose host functions (`proxy_log`,
// `proxy_get_header_map_value`, ...) are imports from the wasm module "env". Node has no such
// module, so without this file no test of such a crate could even start. xtask puts this
// directory on NODE_PATH, so wasm-bindgen's `require('env')` finds it. Unit tests cover the
// host-free logic; a test that does reach the host fails with a message naming the call.
module.exports = new Proxy(
  {},
  {
    get(_target, name) {
      if (typeof name !== "string") {
        return undefined;
      }
      return () => {
        throw new Error(
          `the test called the proxy-wasm host function ${name}; unit tests cover the ` +
            "host-free logic, test host calls in the harness or in Envoy instead",
        );
      };
    },
  },
);
