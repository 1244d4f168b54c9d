import { defineConfig } from "vite";

// The bundle goes into the server crate, which embeds it (see README.md).
export default defineConfig({
  base: "/",
  build: {
    outDir: "../crates/sluice-server/web-dist",
    emptyOutDir: true,
    // The China map is one large JSON module; nothing is fetched from elsewhere.
    chunkSizeWarningLimit: 2048,
  },
});
