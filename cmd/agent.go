package cmd

import "github.com/spf13/cobra"

// TODO(owner of agent): replace this placeholder.
func newAgentCmd() *cobra.Command {
	return &cobra.Command{Use: "agent", Short: "agent (not yet implemented)", Hidden: true}
}
