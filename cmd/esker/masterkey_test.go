package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/esker-io/esker"
	"github.com/esker-io/esker/internal/keyring"
)

// The esker node processes the tests start seal the bank's personal fields
// with this master key; TestMasterKeys checks what happens without one.
func init() { os.Setenv("ESKER_MASTER_KEY", cliMasterKey) }

const cliMasterKey = "cli-1:AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="

// testMasterKey is cliMasterKey as an option of the nodes tests run in
// process.
func testMasterKey() esker.Option {
	k, err := keyring.ParseMasterKey(cliMasterKey)
	if err != nil {
		panic(err)
	}
	return esker.MasterKey(k.ID, k.Key)
}

func TestMasterKeys(t *testing.T) {
	if _, err := loadMasterKeys("", ""); err == nil || !strings.Contains(err.Error(), "--master-key-file") {
		t.Fatalf("no key: %v, want a message naming --master-key-file", err)
	}
	if _, err := loadMasterKeys("", "k1:c2hvcnQ="); err == nil || !strings.Contains(err.Error(), "must be 32") {
		t.Fatalf("short key: %v", err)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "master.key")
	keys, err := devMasterKeys(file) // generates it
	if err != nil || len(keys) != 1 || len(keys[0].Key) != 32 {
		t.Fatalf("dev key: %v %v", keys, err)
	}
	again, err := loadMasterKeys(file, "ignored:when-a-file-is-given")
	if err != nil || string(again[0].Key) != string(keys[0].Key) {
		t.Fatalf("the generated key does not read back: %v", err)
	}
	if info, err := os.Stat(file); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("the key file must be private: %v %v", info.Mode(), err)
	}
	if err := os.WriteFile(file, []byte("# rotated\nk2:AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\nbroken\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadMasterKeys(file, ""); err == nil || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("a broken line: %v, want its number", err)
	}
}
